"""`python run.py replay SESSION`: replay a recorded session through the engine.

Cheap imports only at module level (run.py imports this to build its parser).
"""
from __future__ import annotations

import sys
from pathlib import Path

from .agent import add_agent_arguments
from .turn_end_args import add_turn_end_arguments


def add_arguments(p) -> None:
    p.add_argument("session", metavar="SESSION", help="a session directory (run.py record, the "
                   "browser or live app, run.py data, or another program writing the format)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: out/replay-<session name>)")
    p.add_argument("--realtime", action="store_true",
                   help="replay at the recorded pace on the threaded engine (default: as fast "
                        "as possible on a virtual clock; latencies are then compute latencies)")
    add_agent_arguments(p)
    add_turn_end_arguments(p)
    p.add_argument("--record", default=None, metavar="DIR",
                   help="also record the replayed session into DIR (a new session directory)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a "
                        "busy machine with few cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> None:
    from .session import SessionError
    session = Path(args.session)
    out = Path(args.out) if args.out else Path("out") / f"replay-{session.resolve().name}"
    if args.random and args.model:
        sys.exit("error: pass either --model PATH or --random, not both")
    if args.threads is not None:
        if args.threads < 1:
            sys.exit(f"error: --threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    from .agent import load_agent, random_agent
    from .engine import EngineOptions, with_generation
    from .replay import replay
    from .session import load_session
    try:
        if not len(load_session(session).audio):   # a bad directory fails before the model loads
            raise SessionError(f"{session} has no audio (mic.wav) to replay: the engine "
                               "follows the microphone's clock")
        agent = random_agent("demo", device=args.device) if args.random else \
            load_agent(args.model, device=args.device)
        if args.record and Path(args.record).exists() and any(Path(args.record).iterdir()):
            raise FileExistsError(f"--record {args.record} is not empty; choose a new directory")
        from .turn_end_args import turn_end_kwargs
        options = with_generation(EngineOptions(**turn_end_kwargs(args)), mode=args.mode)
    except (SessionError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    report = replay(session, out, agent, realtime=args.realtime, options=options,
                    progress=not args.no_progress, record=args.record)
    if args.no_progress:
        print((out / "summary.txt").read_text(), end="")
    print(f"\nwrote {out}/report.json, summary.txt, agent.wav, timeline.png and "
          f"{sum(t.audio_file is not None for t in report.turns)} turn WAVs in {out}/turns"
          + (f"; recorded the replay to {args.record}" if args.record else ""))
