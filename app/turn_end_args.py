"""`--turn-end`, `--turn-end-threshold`, `--max-silence`: how live, serve, replay and eval
decide that the user's turn has ended (app/engine.py, turn taking).

Cheap imports only at module level (run.py imports this to build its parsers).
"""
from __future__ import annotations

from speech.constants import TURN_END_THRESHOLD

TURN_END_HELP = ("what ends the user's turn: 'model' (default) the shipped end-of-turn predictor "
                 "assets/turn_end.safetensors, asked at a 0.2 s pause (the fixed silence when the "
                 "file is missing); 'silence' a fixed 0.4 s silence (the old rule); or a PATH to "
                 "another model from `python -m lab.train_turn_end`")


def add_turn_end_arguments(p) -> None:
    g = p.add_argument_group("turn taking")
    g.add_argument("--turn-end", default="model", metavar="model|silence|PATH", help=TURN_END_HELP)
    g.add_argument("--turn-end-threshold", type=float, default=TURN_END_THRESHOLD, metavar="P",
                   help="P(question complete) at a pause that ends the turn (default: %(default)s)")
    g.add_argument("--max-silence", type=float, default=1.2, metavar="S",
                   help="silence that ends the turn when the predictor never says complete "
                        "(default: %(default)s s)")
    g.add_argument("--preemptive-pause", type=float, default=0.1, metavar="S",
                   help="silence at which the reply starts, its output held until the turn "
                        "ends (default: %(default)s s; 0.2, the predictor's pause, starts it "
                        "there; shorter hides more compute latency, and a reply dropped when "
                        "the user goes on costs compute)")


def turn_end_kwargs(args) -> dict:
    """EngineOptions fields from the parsed flags (logs which turn-end rule is used); raises
    FileNotFoundError for a missing PATH."""
    import logging
    import sys
    from .engine import turn_end_choice
    say = None if logging.getLogger().handlers else (lambda s: print(s, file=sys.stderr))
    return {"turn_end_model": turn_end_choice(args.turn_end, say),
            "turn_end_threshold": args.turn_end_threshold,
            "max_end_of_turn_silence": args.max_silence,
            "preemptive_pause": args.preemptive_pause}
