"""`python run.py serve`: the websocket server and the browser client on one port.

Cheap imports only at module level (run.py imports this to build its parser).
"""
from __future__ import annotations

import os
import sys

from .agent import add_agent_arguments
from .turn_end_args import add_turn_end_arguments, turn_end_kwargs


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only; 0.0.0.0 "
                        "listens on every interface and needs --token; note that browsers only "
                        "grant camera/microphone to localhost or https pages)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default: %(default)s)")
    p.add_argument("--token", default=os.environ.get("TANDEM_TOKEN"),
                   help="shared secret clients must send in the handshake (default: "
                        "$TANDEM_TOKEN; none when unset); the page takes it from ?token=...")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept websockets from web pages at ORIGIN (scheme://host[:port]); "
                        "by default only the server's own page may connect (repeatable)")
    p.add_argument("--max-sessions", type=int, default=4,
                   help="concurrent conversations; more clients get a 'busy' error "
                        "(default: %(default)s)")
    p.add_argument("--max-message-mb", type=float, default=4.0,
                   help="largest websocket message accepted, in MiB (default: %(default)s)")
    p.add_argument("--record-dir", default=None, metavar="DIR",
                   help="record every session into DIR/<session id>/ (replay with run.py replay)")
    p.add_argument("--no-user-words", dest="user_words", action="store_false",
                   help="do not transcribe the user's questions for the page (by default each is "
                        "transcribed after its reply by the packaged Whisper tiny.en of "
                        "requirements.txt)")
    add_agent_arguments(p)
    add_turn_end_arguments(p)


def run(args) -> None:
    import asyncio
    import logging
    if args.random and args.model:
        sys.exit("error: pass either --model PATH or --random, not both")
    from .agent import DEFAULT_MODEL
    if not args.random and args.model is None and not DEFAULT_MODEL.exists():
        sys.exit(f"error: the shipped model {DEFAULT_MODEL} is missing. Pass --model PATH, "
                 "or try the plumbing with an untrained model: python run.py serve --random")
    from .engine import EngineOptions, with_generation
    from .server import ServerOptions, serve_until_signal
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        options = ServerOptions(
            host=args.host, port=args.port, token=args.token or None,
            allow_origins=tuple(args.allow_origin),
            max_sessions=args.max_sessions,
            max_message_bytes=int(args.max_message_mb * 1024 * 1024),
            record_dir=args.record_dir, user_words=args.user_words,
            engine=with_generation(EngineOptions(**turn_end_kwargs(args)), mode=args.mode))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    from .host import return_freed_memory
    return_freed_memory()                    # sessions' memory goes back when they end
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    print("loading the model...", flush=True)
    from .agent import load_agent, random_agent
    try:
        agent = random_agent("demo", device=args.device) if args.random else \
            load_agent(args.model, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")

    def ready(server):
        print(ready_message(agent.name, server.url, options), flush=True)
    try:
        asyncio.run(serve_until_signal(agent, options, on_ready=ready))
    except OSError as e:
        sys.exit(f"error: cannot serve on {options.host}:{options.port}: {e} "
                 "(another server on that port? try --port)")
    print("stopped.")


def ready_message(model: str, url: str, options) -> str:
    """What `serve` prints once it listens; never the token itself (terminal logs and
    screen shares would carry it)."""
    token = (f"  the page needs the token: open {url}?token=<your --token>\n"
             if options.token else "")
    return (f"\nTandem ({model}) is serving on {url}\n{token}"
            f"  open it in a browser, press Start, and talk; health check: {url}health\n"
            + (f"  recording sessions into {options.record_dir}/\n" if options.record_dir else "")
            + "  Ctrl-C to stop")
