"""`python run.py eval`: evaluate a fusion model on the demo world's test split (lab/eval.py).

Cheap to import: torch and the evaluation code load only when the command runs.
"""
from __future__ import annotations

import argparse
import sys

DEFAULT_MODEL = "assets/fusion.safetensors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/demo", metavar="DIR",
                   help="data from `python run.py data` (default: %(default)s)")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="the split of DATA to score: test (held-out voices and colour-shape-slot "
                        "triples) or val (default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH",
                   help="fusion checkpoint (default: %(default)s)")
    p.add_argument("--codec", default=None, metavar="DIR",
                   help="the model's codec (default: the one its checkpoint names, or codec/ beside it)")
    p.add_argument("--random", action="store_true",
                   help="an untrained demo-preset agent (tries the plumbing; accuracy ~0)")
    p.add_argument("--modes", default="vanilla,mctp", help="generation modes (default: %(default)s)")
    p.add_argument("--max-sessions", type=int, default=None, metavar="N",
                   help="only the first N sessions of the split")
    p.add_argument("--natural-data", default=None, metavar="DIR",
                   help="also score DIR's test split, whose questions are spoken in a natural voice "
                        "(made by `python run.py data --out DIR --question-voice piper`), reported per "
                        "question type beside the regular split")
    p.add_argument("--no-recognizer", action="store_true",
                   help="skip the independent recogniser (Whisper tiny.en) on the spoken answers: no "
                        "heard-right rates, no word error rate")
    p.add_argument("--no-dnsmos", action="store_true",
                   help="skip DNSMOS (speechmos's speech-quality model) on the spoken answers")
    p.add_argument("--out", default="runs/eval", metavar="DIR",
                   help="eval.json, eval.md, accuracy.png and the replays (default: %(default)s)")
    from app.turn_end_args import add_turn_end_arguments
    add_turn_end_arguments(p)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-audio-seconds", type=float, default=4.0,
                   help="longest reply audio (default: %(default)s)")
    g = p.add_argument_group("ablations")
    g.add_argument("--ablations", action="store_true",
                   help="add the ablation table: trains missing ablation models (no aggregator, "
                        "vision only, audio only) and the full-model control, each with the same "
                        "align budget (--ablation-steps), then scores them text-only")
    g.add_argument("--ablation-names", default="mean,vision,audio", help="default: %(default)s")
    g.add_argument("--ablation-steps", type=int, default=500,
                   help="align steps for each ablation and for the full-model control "
                        "(default: %(default)s)")
    g.add_argument("--train-run", default="runs/fusion", metavar="DIR",
                   help="the main model's training run (options, encoders, cache; default: %(default)s)")
    g.add_argument("--ablation-data", default=None, metavar="DIR",
                   help="no training run at hand (the shipped model): start the ablations from --model's "
                        "encoders instead, with the training split of DIR encoded by them once "
                        "(into ABLATION_ROOT/ablation-source/); e.g. data/demo-large")
    g.add_argument("--ablation-workers", type=int, default=None, metavar="N",
                   help="ablation trainings at once (default: 2 on a CPU with 2+ cores, else 1)")
    g.add_argument("--ablation-root", default="runs", metavar="DIR",
                   help="ablation runs go to DIR/ablation-NAME/ (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def options_from_args(args):
    from lab.eval import EvalOptions
    split = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
    return EvalOptions(
        data=args.data, split=args.split, model=None if args.random else args.model, codec=args.codec,
        random=args.random, modes=split(args.modes), max_sessions=args.max_sessions,
        recognizer=not args.no_recognizer, dnsmos=not args.no_dnsmos, natural_data=args.natural_data,
        out=args.out, device=args.device, threads=args.threads,
        max_audio_seconds=args.max_audio_seconds, ablations=args.ablations,
        turn_end=args.turn_end, turn_end_threshold=args.turn_end_threshold,
        max_end_of_turn_silence=args.max_silence, preemptive_pause=args.preemptive_pause,
        ablation_names=split(args.ablation_names), ablation_steps=args.ablation_steps,
        train_run=args.train_run, ablation_data=args.ablation_data,
        ablation_root=args.ablation_root, ablation_workers=args.ablation_workers, progress=not args.quiet)


def run(args) -> None:
    try:
        o = options_from_args(args)
        from lab.eval import evaluate
        report = evaluate(o)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"eval: {e}")
    print(f"\nwritten: {report.out_dir / 'eval.json'}, {report.out_dir / 'eval.md'}, "
          f"{report.out_dir / 'accuracy.png'}")
