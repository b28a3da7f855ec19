"""Browser streaming: one asyncio websockets server serving the websocket protocol on /ws
(app/protocol.py), the browser client (GET / and /static/*) and a health check
(GET /health) and what the page says about the model (GET /info, app/server_scene.py) on
one port.

Each connection is its own `Engine` over the shared `Agent` (weights loaded once). The event
loop only moves bytes: every connection has one worker thread that resamples, decodes JPEGs,
records and pushes into its engine, so a slow session never blocks the loop or the others.
Engine outputs (from the reply worker thread) come back to the loop through
`loop.call_soon_threadsafe` into a per-connection queue and are sent from there
(app/server_session.py).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import signal
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.protocol import State
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import protocol as P
from .agent import Agent
from .engine import EngineOptions

log = logging.getLogger("tandem.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
WS_PATH = "/ws"


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8765                     # 0: an ephemeral port (tests)
    token: str | None = None             # when set, the client handshake must carry it
    max_sessions: int = 4
    max_message_bytes: int = 4 * 1024 * 1024   # websocket max_size (whole messages)
    record_dir: str | None = None        # record every session into RECORD_DIR/<session>/
    engine: EngineOptions = field(default_factory=EngineOptions)
    handshake_timeout: float = 10.0      # s for a client to send its handshake
    max_errors: int = 50                 # protocol errors before a client is dropped
    input_queue: int = 256               # messages buffered per session before backpressure
    input_queue_bytes: int = 16 * 1024 * 1024  # ...or payload bytes (then one more message)
    allow_origins: tuple[str, ...] = ()  # web origins allowed besides the server's own page
    user_words: bool = True              # transcribe each question for the page, after its reply
                                         # (when the dev-only recogniser is installed)

    def __post_init__(self):
        if self.token is None and not is_loopback(self.host):
            raise ValueError(f"binding to {self.host!r} serves every machine that can reach it: "
                             "pass --token SECRET (or set TANDEM_TOKEN) so that only clients "
                             "knowing it can talk, or bind to 127.0.0.1")
        for origin in self.allow_origins:
            u = urlsplit(origin)
            if u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/"):
                raise ValueError(f"allowed origin {origin!r} must be scheme://host[:port], "
                                 "e.g. https://app.example")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within [0, 65535], got {self.port}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_message_bytes < 64 * 1024:
            raise ValueError(f"max message size must be >= 64 KiB, got {self.max_message_bytes} bytes")
        if self.token is not None and not self.token:
            raise ValueError("token must be a non-empty string (or None for no token)")
        if (self.handshake_timeout <= 0 or self.max_errors < 1 or self.input_queue < 1
                or self.input_queue_bytes < 1):
            raise ValueError("handshake_timeout must be > 0, max_errors, input_queue and "
                             "input_queue_bytes >= 1")

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.rstrip("/").lower() for o in self.allow_origins)

    @property
    def limits(self) -> dict:
        """Per-kind payload limits, capped below the websocket's max message size."""
        return {k: min(v, self.max_message_bytes - 1) for k, v in P.DEFAULT_LIMITS.items()}


def is_loopback(host: str) -> bool:
    """True for a name or address that only this machine reaches."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Server:
    """The server; `await start()` binds (see `port`), `await shutdown()` stops gracefully:
    it stops accepting, tells every client {"type": "shutdown"}, closes the sessions and
    finishes their recordings."""

    def __init__(self, agent: Agent, options: ServerOptions = ServerOptions()):
        self.agent, self.options = agent, options
        self.sessions: dict = {}              # session id -> ClientSession (handshake done)
        self._ws = None
        self._closing = False
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = self.options.host
        host = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "") else host)
        return f"http://{host}:{self.port}/"

    async def start(self) -> "Server":
        o = self.options
        self._ws = await serve(self._handler, o.host, o.port, process_request=self._http,
                               create_connection=_connection_class(o.max_message_bytes),
                               max_size=o.max_message_bytes, compression=None,
                               ping_interval=20, ping_timeout=20, close_timeout=5,
                               server_header="tandem")
        self.port = self._ws.sockets[0].getsockname()[1]
        log.info("serving %s on %s (websocket %s)", self.agent.name, self.url, WS_PATH)
        return self

    async def shutdown(self, reason: str = "the server is shutting down") -> None:
        if self._ws is None or self._closing:
            return
        self._closing = True                         # from now on handshakes are refused
        await asyncio.gather(*(s.shutdown(reason) for s in list(self.sessions.values())),
                             return_exceptions=True)
        self._ws.close()          # stop listening; close what is left (clients mid-handshake)
        await self._ws.wait_closed()
        log.info("server stopped")

    # --- HTTP: the client, its static files and the health check ---------------------------
    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            refused = self._refuse_origin(request.headers)
            if refused:
                log.info("websocket from %s refused: %s", connection.remote_address, refused)
                return _response(403, refused.encode(), "text/plain; charset=utf-8")
            return None                               # go on with the websocket handshake
        if path == "/health":
            body = {"status": "closing" if self._closing else "ok", "sessions": len(self.sessions),
                    "max_sessions": self.options.max_sessions, "model": self.agent.name}
            return _response(503 if self._closing else 200, json.dumps(body).encode(),
                             "application/json")
        if path == "/info":                          # what the page says about the model
            from .server_scene import page_info
            return _response(200, json.dumps(page_info(self.agent.name)).encode(),
                             "application/json")
        name = "index.html" if path in ("/", "/index.html") else (
            path[len("/static/"):] if path.startswith("/static/") else None)
        if name and "/" not in name and not name.startswith(".") and (STATIC_DIR / name).is_file():
            ctype = CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")
            return _response(200, (STATIC_DIR / name).read_bytes(), ctype)
        return _response(404, f"not found: {path} (the client is at /, the websocket at "
                              f"{WS_PATH})".encode(), "text/plain; charset=utf-8")

    def _refuse_origin(self, headers: Headers) -> str | None:
        """Why a websocket upgrade is refused, or None. Browsers send the page's Origin:
        only the server's own page (Origin's host:port = the Host asked for) and
        `allow_origins` may talk to it, so no other web page a user visits can. A server on
        loopback also needs a loopback Host (a DNS-rebound name is someone else's page).
        Clients that send no Origin are programs, not pages: the token guards those."""
        host = (headers.get("Host") or "").lower()
        if is_loopback(self.options.host) and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return (f"this server listens on {self.options.host} only; the Host {host!r} is not "
                    "this machine's name (open the page at the address the server printed)")
        origin = headers.get("Origin")
        if origin is None:
            return None
        origin = origin.rstrip("/").lower()
        u = urlsplit(origin)
        if (u.scheme in ("http", "https") and u.netloc == host) or origin in self.options.origins:
            return None
        return (f"websocket from the web page at origin {origin!r} refused: only this server's "
                "own page may connect (start the server with --allow-origin ORIGIN to allow "
                "another)")

    # --- websocket ---------------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        from .server_session import ClientSession
        session = None
        try:
            hello = await self._handshake(ws)
            if hello is None:
                return
            sid = uuid.uuid4().hex[:12]
            session = ClientSession(self, ws, hello, sid)
            self.sessions[sid] = session          # registered before any await: no race
            await session.run()
        except ConnectionClosed:
            pass
        except Exception:                          # never let one client take the server down
            log.exception("connection from %s failed", ws.remote_address)
            await _close(ws, P.INTERNAL, "internal server error; see the server log", 1011)
        finally:
            if session is not None:
                await session.close()
                self.sessions.pop(session.id, None)

    async def _handshake(self, ws: ServerConnection) -> P.ClientHello | None:
        """Reads and checks the client's handshake; on failure sends an error, closes and
        returns None."""
        o = self.options
        if self._closing:
            await _close(ws, P.BUSY, "the server is shutting down", 1001)
            return None
        try:
            async with asyncio.timeout(o.handshake_timeout):
                message = await ws.recv()
        except TimeoutError:
            await _close(ws, P.TIMEOUT, f"no handshake within {o.handshake_timeout:g} s", 1008)
            return None
        try:
            kind, payload = P.decode(message, "client", o.limits)
            if kind != P.Kind.HANDSHAKE:
                raise P.ProtocolError(P.BAD_HANDSHAKE, f"the first message must be a handshake "
                                                       f"(kind 0), got kind {int(kind)}")
            hello = P.parse_client_handshake(payload)
        except P.ProtocolError as e:
            await _close(ws, e.code, e.message, 1002)
            return None
        if o.token is not None and not hmac.compare_digest(
                (hello.token or "").encode(), o.token.encode()):
            what = "missing" if hello.token is None else "wrong"
            await _close(ws, P.UNAUTHORIZED, f"{what} token: this server needs the token it "
                                             "was started with (--token) in the handshake", 1008)
            return None
        if len(self.sessions) >= o.max_sessions:
            await _close(ws, P.BUSY, f"the server is busy: all {o.max_sessions} sessions are in "
                                     "use; try again later", 1013)
            return None
        return hello


def _response(status: int, body: bytes, content_type: str) -> Response:
    from http import HTTPStatus
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache"), ("Connection", "close")])
    return Response(status, HTTPStatus(status).phrase, headers, body)


def _connection_class(max_bytes: int) -> type[ServerConnection]:
    """ServerConnection that, when the library fails a connection for a message over
    `max_bytes` (close code 1009), first sends a protocol error saying so."""
    class Connection(ServerConnection):
        def __init__(self, protocol, *args, **kwargs):
            super().__init__(protocol, *args, **kwargs)
            fail = protocol.fail

            def fail_with_error(code, reason=""):
                if code == 1009 and protocol.state is State.OPEN:
                    protocol.send_binary(P.error(P.TOO_LARGE, (
                        f"message over the server's {max_bytes}-byte limit ({reason}); the "
                        "server was started with --max-message-mb "
                        f"{max_bytes / 1024 / 1024:g}; closing")))
                fail(code, reason)
            protocol.fail = fail_with_error
    return Connection


async def _close(ws: ServerConnection, code: str, message: str, close_code: int) -> None:
    """Send an error message, then close the connection with `close_code`."""
    try:
        await ws.send(P.error(code, message))
        await ws.close(close_code, code)
    except ConnectionClosed:
        pass


# --- running it ----------------------------------------------------------------------------
async def serve_until_signal(agent: Agent, options: ServerOptions, on_ready=None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully."""
    server = await Server(agent, options).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(server)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.shutdown()


class ServerThread:
    """A server on its own event loop in a background thread (tests, notebooks):
    `with ServerThread(agent, options) as s: ... s.url ...`."""

    def __init__(self, agent: Agent, options: ServerOptions = ServerOptions(port=0)):
        self.server = Server(agent, options)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="tandem-server")

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1).rstrip("/") + WS_PATH

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "ServerThread":
        self._thread.start()
        self.call(self.server.start())
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self.call(self.server.shutdown(), timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.loop.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
