"""app.server: a real server on 127.0.0.1 (ephemeral port) with a random tiny agent, real
websocket clients, espeak-ng speech. Every wait is bounded."""
from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app import protocol as P
from app.agent import random_agent
from app.server import ServerOptions, ServerThread
from app.session import load_session
from speech.audio import float_to_pcm16, resample
from speech.constants import SAMPLE_RATE
from tests.fixtures_audio import synth_speech


@pytest.fixture(scope="module")
def agent():
    return random_agent("tiny")


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> np.ndarray:
    """A spoken question at 16 kHz: 0.3 s of silence, the question, 1.2 s of silence."""
    x = synth_speech("What is the red object on the table?", tmp_path_factory.mktemp("q"), "q")
    z = lambda s: np.zeros(int(s * SAMPLE_RATE), np.float32)  # noqa: E731
    return np.concatenate([z(0.3), 0.8 * x / np.abs(x).max(), z(1.2)])


@pytest.fixture
def server(agent):
    with ServerThread(agent, ServerOptions(port=0)) as s:
        yield s


def jpeg(level: int = 90) -> bytes:
    img = np.full((120, 160, 3), level, np.uint8)
    cv2.rectangle(img, (40, 30), (90, 80), (40, 40, 220), -1)
    return cv2.imencode(".jpg", img)[1].tobytes()


def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


class Client:
    """A protocol client collecting what the server sends."""

    def __init__(self, ws, hello: dict):
        self.ws, self.hello = ws, hello
        self.audio = bytearray()
        self.events: list[dict] = []
        self.errors: list[dict] = []
        self.log: list[str] = []                       # "audio" or the event type, in order
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._loop())

    @classmethod
    async def open(cls, url: str, **handshake) -> "Client":
        ws = await connect(url, max_size=None, open_timeout=10)
        await ws.send(P.encode(P.Kind.HANDSHAKE, {"protocol": 1, **handshake}))
        kind, payload = P.decode(await asyncio.wait_for(ws.recv(), 10), "server")
        if kind == P.Kind.ERROR:
            raise P.ProtocolError(payload["code"], payload["message"])
        assert kind == P.Kind.HANDSHAKE, (kind, payload)
        return cls(ws, payload)

    async def _loop(self):
        try:
            async for m in self.ws:
                kind, p = P.decode(m, "server")
                self.log.append("audio" if kind == P.Kind.AUDIO_OUT else p.get("type", "error"))
                if kind == P.Kind.AUDIO_OUT:
                    self.audio += p
                else:
                    (self.errors if kind == P.Kind.ERROR else self.events).append(p)
                self.changed.set()
        except ConnectionClosed:
            pass
        self.changed.set()

    def of(self, type_: str) -> list[dict]:
        return [e for e in self.events if e["type"] == type_]

    async def wait(self, pred, timeout: float = 20.0, what: str = ""):
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                if self.task.done():
                    assert pred(), f"connection closed before {what or pred}"
                await self.changed.wait()

    async def error(self, message, timeout: float = 10.0) -> dict:
        n = len(self.errors)
        await self.ws.send(message)
        await self.wait(lambda: len(self.errors) > n, timeout, "an error")
        return self.errors[n]

    async def stream(self, pcm: np.ndarray, rate: int = SAMPLE_RATE, speed: float = 1.0,
                     frames_every: float = 0.25):
        """Send `pcm` in 20 ms messages, paced at `speed` x real time, with a JPEG frame
        every `frames_every` s of audio."""
        data, n = float_to_pcm16(pcm).tobytes(), 2 * rate // 50
        t0, next_frame = time.perf_counter(), 0.0
        for i in range(0, len(data), n):
            t = i / 2 / rate
            if t >= next_frame:
                await self.ws.send(P.encode(P.Kind.VIDEO_IN, jpeg()))
                next_frame += frames_every
            await self.ws.send(P.encode(P.Kind.AUDIO_IN, data[i:i + n]))
            await asyncio.sleep(max(0.0, t0 + (t + n / 2 / rate) / speed - time.perf_counter()))

    async def close(self):
        await self.ws.close()
        await asyncio.wait_for(self.task, 10)


async def converse(url: str, pcm: np.ndarray, until: str, timeout: float,
                   speed: float = 1.0) -> Client:
    """Say `pcm` in a new session and wait for the first event of type `until`."""
    c = await Client.open(url)
    await c.stream(pcm, speed=speed)
    await c.wait(lambda: c.of(until), timeout, until)
    await c.close()
    return c


def rms(pcm16: bytes) -> float:
    return float(np.sqrt(np.mean((np.frombuffer(pcm16, "<i2") / 32767.0) ** 2)))


def test_http_health_and_static_client(server):
    code, ctype, body = http_get(server.url + "health")
    assert code == 200 and ctype == "application/json"
    assert json.loads(body) == {"status": "ok", "sessions": 0, "max_sessions": 4,
                                "model": "random-tiny"}
    code, ctype, body = http_get(server.url)
    assert code == 200 and ctype.startswith("text/html") and b"client.js" in body
    for name in ("client.js", "worklets.js"):
        code, ctype, body = http_get(server.url + "static/" + name)
        assert code == 200 and ctype.startswith("text/javascript") and len(body) > 500
    for path in ("nope", "static/../server.py", "static/%2e%2e/server.py", "static/.hidden"):
        assert http_get(server.url + path)[0] == 404, path


def test_handshake_and_bad_handshakes(server):
    async def main():
        c = await Client.open(server.ws_url, input_rate=16000)
        assert c.hello["protocol"] == 1 and len(c.hello["session"]) >= 8
        assert c.hello["output_rate"] == 16000 and c.hello["model"] == "random-tiny"
        assert c.hello["input_rate"] == 16000
        assert json.loads(http_get(server.url + "health")[2])["sessions"] == 1
        await c.close()
        for hs, code in (({"protocol": 2}, P.BAD_HANDSHAKE), ({"input_rate": 96000}, P.BAD_HANDSHAKE)):
            with pytest.raises(P.ProtocolError) as e:
                await Client.open(server.ws_url, **hs)
            assert e.value.code == code
        async with connect(server.ws_url) as ws:       # media before the handshake
            await ws.send(P.encode(P.Kind.AUDIO_IN, bytes(640)))
            assert P.decode(await ws.recv(), "server")[1]["code"] == P.BAD_HANDSHAKE
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
    asyncio.run(main())


def test_token(agent):
    with ServerThread(agent, ServerOptions(port=0, token="s3cret")) as s:
        async def main():
            for hs, text in (({}, "missing token"), ({"token": "guess"}, "wrong token")):
                with pytest.raises(P.ProtocolError) as e:
                    await Client.open(s.ws_url, **hs)
                assert e.value.code == P.UNAUTHORIZED and text in e.value.message
            c = await Client.open(s.ws_url, token="s3cret")
            await c.close()
        asyncio.run(main())


def test_max_sessions_busy(agent):
    with ServerThread(agent, ServerOptions(port=0, max_sessions=1)) as s:
        async def main():
            first = await Client.open(s.ws_url)
            with pytest.raises(P.ProtocolError) as e:
                await Client.open(s.ws_url)
            assert e.value.code == P.BUSY and "1 sessions" in e.value.message
            await first.close()
            async with asyncio.timeout(10):             # the slot frees up
                while json.loads(http_get(s.url + "health")[2])["sessions"]:
                    await asyncio.sleep(0.05)
            await (await Client.open(s.ws_url)).close()
        asyncio.run(main())


async def misbehave(url: str, limits: dict) -> dict:
    """Every kind of bad input; returns {case: error code}. Stays connected throughout."""
    bad = await Client.open(url)
    fake_jpeg = b"\xff\xd8\xff\xe0" + b"garbage" * 20 + b"\xff\xd9"
    cases = {"garbage": b"\x07\x13\x37garbage", "empty": b"", "text": "hello",
             "wrong_direction": P.encode(P.Kind.AUDIO_OUT, bytes(64)),
             "odd_pcm": b"\x01" + bytes(641), "not_jpeg": b"\x02GIF89a" + bytes(100),
             "truncated_jpeg": P.encode(P.Kind.VIDEO_IN, jpeg()[:-300]),
             "undecodable_jpeg": P.encode(P.Kind.VIDEO_IN, fake_jpeg),
             "bad_json": b"\x04{\"type\": ", "not_utf8": b"\x04\xff\xfe\xfd",
             "unknown_event": P.encode(P.Kind.EVENT, {"type": "dance"}),
             "bad_action": P.encode(P.Kind.EVENT, {"type": "control", "action": "explode"}),
             "second_handshake": P.encode(P.Kind.HANDSHAKE, {"protocol": 1}),
             "oversized_audio": b"\x01" + bytes(limits[P.Kind.AUDIO_IN] + 2)}
    codes = {}
    for name, message in cases.items():
        codes[name] = (await bad.error(message))["code"]
        await asyncio.sleep(0.05)
    await bad.ws.send(P.encode(P.Kind.AUDIO_IN, bytes(640)))      # still a working session
    await bad.ws.send(P.encode(P.Kind.EVENT, {"type": "control", "action": "reset"}))
    await asyncio.sleep(0.3)
    assert not bad.task.done() and len(bad.errors) == len(cases), bad.errors
    # over the websocket's max_size: a protocol error saying so, then closed (1009)
    await bad.ws.send(b"\x02" + bytes(4 * 1024 * 1024 + 10))
    await asyncio.wait_for(bad.task, 10)
    assert "--max-message-mb" in bad.errors[-1]["message"]
    codes["over_max_size"] = (bad.errors[-1]["code"], bad.ws.close_code)
    # a raw TCP client: garbage instead of HTTP, then a truncated websocket frame
    for raw in (b"\x00\x01garbage\r\n\r\n", None):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])), 5) as sock:
            if raw is None:
                port_host = url.split("//")[1].split("/")[0]
                sock.sendall(f"GET /ws HTTP/1.1\r\nHost: {port_host}\r\nUpgrade: websocket\r\n"
                             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             "Sec-WebSocket-Version: 13\r\n\r\n".encode())
                sock.recv(4096)
                sock.sendall(b"\x82\xfe\x10\x00\x01\x02\x03\x04" + bytes(100))  # says 4096 B, masked
            else:
                sock.sendall(raw)
            await asyncio.sleep(0.2)
    # too many errors: dropped
    spam = await Client.open(url)
    try:
        for _ in range(1000):
            await spam.ws.send(b"\x09")
            await asyncio.sleep(0.002)
    except ConnectionClosed:
        pass
    await asyncio.wait_for(spam.task, 10)
    codes["spam"] = spam.errors[-1]["code"]
    return codes


def test_misbehaving_client_does_not_disturb_others(server, question):
    limits = server.server.options.limits

    async def main():
        return await asyncio.gather(converse(server.ws_url, question, "metrics", 30),
                                    misbehave(server.ws_url, limits))

    c, codes = asyncio.run(main())
    assert codes == {
        "garbage": P.UNKNOWN_KIND, "empty": P.BAD_MESSAGE, "text": P.BAD_MESSAGE,
        "wrong_direction": P.WRONG_DIRECTION, "odd_pcm": P.BAD_AUDIO, "not_jpeg": P.BAD_VIDEO,
        "truncated_jpeg": P.BAD_VIDEO, "undecodable_jpeg": P.BAD_VIDEO, "bad_json": P.BAD_JSON,
        "not_utf8": P.BAD_JSON, "unknown_event": P.BAD_EVENT, "bad_action": P.BAD_EVENT,
        "second_handshake": P.BAD_HANDSHAKE, "oversized_audio": P.TOO_LARGE,
        "over_max_size": (P.TOO_LARGE, 1009), "spam": P.TOO_MANY_ERRORS}
    # the well-behaved client had its conversation: events in order, non-silent reply audio
    types = [e["type"] for e in c.events if e["type"] != "reply_text"]
    assert types[:3] == ["speech_start", "speech_end", "turn_start"], types
    assert types.index("turn_start") < types.index("turn_end") < types.index("metrics")
    assert not c.errors
    m = c.of("metrics")[0]
    assert m["turn"] == 1 and not m["interrupted"] and m["reply_seconds"] > 0.1
    assert len(c.audio) == 2 * round(m["reply_seconds"] * c.hello["output_rate"])
    assert rms(c.audio) > 0.005
    assert 0.4 <= m["response_latency"] < 5 and 0 < m["compute_latency"] < 5
    assert 0.3 < m["browser_response_latency"] < 5
    assert json.loads(http_get(server.url + "health")[2])["status"] == "ok"


def test_recording_48k_input_disconnect_mid_reply_and_control(agent, question, tmp_path):
    opts = ServerOptions(port=0, record_dir=str(tmp_path / "rec"))
    q48 = resample(question, SAMPLE_RATE, 48000)
    with ServerThread(agent, opts) as s:
        async def main():
            c = await Client.open(s.ws_url, input_rate=48000)
            assert c.hello["input_rate"] == 48000
            await c.stream(q48, rate=48000, speed=3.0)
            await c.wait(lambda: len(c.audio) > 0, 30, "reply audio")
            c.ws.transport.abort()                    # gone mid-reply, without a close
            await asyncio.wait_for(c.task, 10)
            # the server carries on: a second client interrupts its own reply by control
            d = await Client.open(s.ws_url)
            await d.stream(question, speed=3.0)
            await d.wait(lambda: len(d.audio) > 0, 30, "reply audio")
            await d.ws.send(P.encode(P.Kind.EVENT, {"type": "control", "action": "interrupt"}))
            await d.wait(lambda: d.of("metrics") and d.of("interrupt"), 30, "interrupt")
            await d.close()
            return c.hello["session"], d
        sid, d = asyncio.run(main())
        assert d.of("interrupt")[0]["reason"] == "control"
        # the reply stopped before the interrupt went out (unless it had already ended)
        assert "audio" not in d.log[d.log.index("interrupt"):], d.log
        async def idle():
            async with asyncio.timeout(10):
                while json.loads(http_get(s.url + "health")[2])["sessions"]:
                    await asyncio.sleep(0.05)
        asyncio.run(idle())
    sess = load_session(tmp_path / "rec" / sid)
    assert sess.meta["source"] == "browser" and sess.meta["input_rate"] == 48000
    assert abs(len(sess.audio) - len(question)) <= 2           # resampled back to 16 kHz
    corr = np.corrcoef(sess.audio[:len(question) - 2], question[:len(question) - 2])[0, 1]
    assert corr > 0.99
    assert len(sess.frames) == int(np.ceil(len(question) / SAMPLE_RATE / 0.25))
    assert sess.read_frame(0).shape == (120, 160, 3)
    types = [e["type"] for e in sess.events]
    assert {"speech_start", "speech_end", "turn_end", "turn_done"} <= set(types), types
    assert not sess.warnings


def test_graceful_shutdown(agent, question, tmp_path):
    s = ServerThread(agent, ServerOptions(port=0, record_dir=str(tmp_path))).start()
    async def connect_and_talk():
        c = await Client.open(s.ws_url)
        await c.stream(question[:SAMPLE_RATE], speed=4.0)
        return c
    async def main():
        c = await connect_and_talk()
        await asyncio.to_thread(s.stop)
        await asyncio.wait_for(c.task, 10)
        return c
    c = asyncio.run(main())
    assert c.of("shutdown") and c.ws.close_code == 1001
    sess = load_session(tmp_path / c.hello["session"])
    assert sess.meta["duration"] == pytest.approx(1.0, abs=0.01)   # finalised by close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.server.port), 2).close()


def test_an_input_rate_sharing_no_factor_with_16k(agent, question, tmp_path):
    """8003 Hz: the session opens (its resampler is built off the event loop, at the cost of
    any other: tests/test_resample.py) and its audio arrives resampled to 16 kHz."""
    q = resample(question[:SAMPLE_RATE], SAMPLE_RATE, 8003)
    with ServerThread(agent, ServerOptions(port=0, record_dir=str(tmp_path))) as s:
        async def main():
            c = await Client.open(s.ws_url, input_rate=8003)
            await c.stream(q, rate=8003, speed=4.0, frames_every=10.0)
            await c.close()
            async with asyncio.timeout(10):
                while json.loads(http_get(s.url + "health")[2])["sessions"]:
                    await asyncio.sleep(0.05)
            return c.hello
        hello = asyncio.run(main())
    assert hello["input_rate"] == 8003
    sess = load_session(tmp_path / hello["session"])
    assert abs(len(sess.audio) - SAMPLE_RATE) <= 2
    assert np.corrcoef(sess.audio[400:-400], question[400:SAMPLE_RATE - 400])[0, 1] > 0.99


def test_a_bind_beyond_this_machine_needs_a_token():
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        with pytest.raises(ValueError, match="--token"):
            ServerOptions(host=host)
        assert ServerOptions(host=host, token="s3cret").token == "s3cret"
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert ServerOptions(host=host).token is None


def _upgrade(port: int, host: str, origin: str | None) -> bytes:
    """A raw websocket upgrade request; returns the status line."""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n"
                      + (f"Origin: {origin}\r\n" if origin else "") + "\r\n").encode())
        sock.settimeout(5)
        return sock.recv(4096).split(b"\r\n", 1)[0]


def test_websocket_origin_must_be_the_servers_own(agent):
    opts = ServerOptions(port=0, allow_origins=("https://app.example",))
    with ServerThread(agent, opts) as s:
        port, own = s.server.port, f"127.0.0.1:{s.server.port}"
        assert b"101" in _upgrade(port, own, f"http://{own}")           # the page it serves
        assert b"101" in _upgrade(port, f"localhost:{port}", f"http://localhost:{port}")
        assert b"101" in _upgrade(port, own, None)                       # not a browser
        assert b"101" in _upgrade(port, own, "https://app.example")      # --allow-origin
        for host, origin in ((own, "http://evil.example"), (own, "null"),
                             (own, f"http://127.0.0.1:{port + 1}"),
                             (f"evil.example:{port}", f"http://evil.example:{port}")):  # rebinding
            assert b"403" in _upgrade(port, host, origin), (host, origin)

        async def main():
            with pytest.raises(Exception) as e:
                await connect(s.ws_url, origin="http://evil.example", open_timeout=10)
            assert "403" in str(e.value)
            await (await Client.open(s.ws_url)).close()                 # no Origin: fine
        asyncio.run(main())
    with pytest.raises(ValueError, match="origin"):
        ServerOptions(allow_origins=("evil.example",))                  # needs a scheme


def test_the_token_is_not_printed():
    from app.server_cli import ready_message
    opts = ServerOptions(host="0.0.0.0", port=8765, token="s3cret")
    text = ready_message("random-demo", "http://127.0.0.1:8765/", opts)
    assert "s3cret" not in text and "?token=" in text and "http://127.0.0.1:8765/" in text


def test_input_backlog_is_bounded_in_bytes(agent, monkeypatch):
    """A client sending large frames faster than its session decodes them is held back by
    the byte budget (TCP backpressure), not buffered: 256 queued 2 MB frames were 512 MB."""
    from app.server_session import ClientSession
    slow = ClientSession._process
    monkeypatch.setattr(ClientSession, "_process",
                        lambda self, kind, payload: (time.sleep(0.02), slow(self, kind, payload)))
    noise = np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)
    big = P.encode(P.Kind.VIDEO_IN, cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    budget = 512 * 1024
    with ServerThread(agent, ServerOptions(port=0, input_queue_bytes=budget)) as s:
        async def main():
            c = await Client.open(s.ws_url)
            for _ in range(30):
                await c.ws.send(big)
            session = next(iter(s.server.sessions.values()))
            await c.close()
            return session
        session = asyncio.run(main())
    assert len(big) > 200_000 and session.peak_queued_bytes >= budget
    assert session.peak_queued_bytes <= budget + len(big)


def test_the_users_words_reach_the_page_after_the_reply(server, question):
    """The question is transcribed (the dev-only recogniser) after its reply was made, and the
    page gets it as a `transcript` event for that turn."""
    c = asyncio.run(converse(server.ws_url, question, "transcript", 60, speed=4.0))
    (t,) = c.of("transcript")
    assert t["turn"] == 1
    assert {"what", "the", "table"} <= set(t["text"].lower().replace("?", "").split()), t  # the question
    assert c.log.index("metrics") < c.log.index("transcript")     # off the reply's path
