#!/usr/bin/env python3
"""Tandem command line: live | serve | replay | record | data | train | eval | bench.

Thin by design: it parses arguments and hands over to the package that does the work.
`python run.py COMMAND --help` describes each command.
"""
from __future__ import annotations

import argparse
import importlib
import sys

DEFAULT_MODEL = "assets/fusion.safetensors"
# `run.py data` choices, spelled here so --help stays instant (tests/test_data_voices.py checks
# they equal demo.replies.REPLY_VERSIONS and demo.voices.QUESTION_VOICES)
DATA_REPLIES = ("v1", "v2")
DATA_QUESTION_VOICES = ("mix", "espeak", "piper")


def _not_built(name: str):
    def run(_args):
        sys.exit(f"`run.py {name}` is not built yet in this checkout.")
    return run


def cmd_bench(args):
    if args.barge_in:
        from lab.bench_barge_in import run_cli
        return run_cli(args)
    import os
    if args.soak:
        from lab.soak import SoakOptions, run_soak
        model = "random" if args.random else (None if args.model == DEFAULT_MODEL else args.model)
        run_soak(SoakOptions(turns=4 if args.quick else 8, churn=100, cycles=600,
                             fuzz_rounds=1 if args.quick else 3, model=model), args.json)
        return
    from lab.bench import format_report, run_bench
    model = args.model
    if model == DEFAULT_MODEL and not os.path.exists(model):
        print(f"(no trained model at {model}: benchmarking the demo preset with random weights)")
        model = None
    report = run_bench(model, device=args.device, json_path=args.json, quick=args.quick, train=not args.no_train)
    print(format_report(report))
    if args.json:
        print(f"\nJSON written to {args.json}")


def cmd_data(args):
    from lab.data import DataOptions, main
    opts = {k: v for k, v in dict(n_train_sessions=args.train, n_val_sessions=args.val,
                                  n_test_sessions=args.test, turns_per_session=args.turns).items()
            if v is not None}
    if args.agent_voice is not None:
        opts["agent_voice"] = args.agent_voice
    if args.hesitations is not None:
        opts["hesitation_prob"] = args.hesitations
    if args.codec_sentences is not None:
        opts.update(n_codec_sentences=args.codec_sentences,
                    n_codec_eval=min(DataOptions.n_codec_eval, args.codec_sentences // 15))
    if args.question_voice == "piper":       # a test-only split unless told otherwise (refused then),
        opts = {"n_train_sessions": 0, "n_val_sessions": 0,     # no codec corpus: nothing trains
                "n_codec_sentences": 0, "n_codec_eval": 0, **opts}
    try:
        main(args.out, seed=args.seed, workers=args.workers, replies=args.replies,
             question_voice=args.question_voice, **opts)
    except ValueError as e:
        sys.exit(f"run.py data: {e}")


def _voice_arg(spec: str) -> str:
    from speech.tts import parse_voice
    try:
        parse_voice(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    text = "benchmarks: codec streaming, vanilla vs MCTP, compute latency, training steps"
    b = sub.add_parser("bench", help=text, description=(
        f"{text}. Compute latency = end-of-turn decision to the first reply audio ready. Ratios "
        "are measured side by side in one run; absolute times depend on the hardware, printed too."))
    b.add_argument("--model", default=DEFAULT_MODEL, help="fusion checkpoint (default: %(default)s; "
                   "the demo preset with random weights when it does not exist)")
    b.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    b.add_argument("--quick", action="store_true", help="shorter runs (for smoke tests)")
    b.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    b.add_argument("--soak", action="store_true",
                   help="instead: the server under a fuzzing client and 100 connection churns "
                        "beside a well-behaved session (its reply latency p95 alone vs under "
                        "attack), then server memory over 600 session open/close cycles "
                        "(loopback only; lab/soak.py)")
    b.add_argument("--random", action="store_true", help="with --soak: an untrained demo-preset server")
    b.add_argument("--barge-in", action="store_true", help="only barge-in latency (speech onset to "
                   "the agent's last sample out), on the engine and live on a virtual sound card")
    b.set_defaults(func=cmd_bench)

    text = "render the demo world: sessions for val/test, shards for training"
    d = sub.add_parser("data", help=text, description=(
        f"{text}, and the codec corpus (the agent's voice). The demo world: up to 3 coloured "
        "shapes in left/middle/right slots, high or low beeps, spoken questions about them."))
    d.add_argument("--out", default="data/demo", help="output directory (default: %(default)s)")
    d.add_argument("--train", type=int, default=None, help="training sessions")
    d.add_argument("--val", type=int, default=None, help="validation sessions")
    d.add_argument("--test", type=int, default=None, help="test sessions")
    d.add_argument("--turns", type=int, default=None, help="turns per session")
    d.add_argument("--seed", type=int, default=0,
                   help="world seed; another seed renders other scenes and voices, e.g. a second test "
                        "split for choosing between models (default: %(default)s)")
    d.add_argument("--workers", type=int, default=2, help="rendering processes (default: %(default)s)")
    d.add_argument("--agent-voice", type=_voice_arg, default=None, metavar="SPEC",
                   help="the agent's voice for the answers and the codec corpus: "
                        "piper:en_US-joe-medium (Piper, requirements-dev.txt), espeak-ng "
                        "NAME[+VARIANT][:RATE_WPM[:PITCH]], flite:NAME (awb, kal, kal16, rms, slt) or "
                        "festival:NAME (make system-dev) (default: piper:en_US-joe-medium, the "
                        "shipped model's; rounds 1-11: en-us+m3:165:50)")
    d.add_argument("--hesitations", type=float, default=None, metavar="P",
                   help="share of questions spoken with one 0.3-1.0 s pause at a word boundary "
                        "(DEMO_WORLD.md version 2: 0.25; default: 0, none)")
    d.add_argument("--codec-sentences", type=int, default=None, metavar="N",
                   help="codec training sentences in the agent's voice (0: none, for a split "
                        "that is only evaluated; one in 15 more is held out; default: 1500 and 100)")
    d.add_argument("--replies", choices=DATA_REPLIES, default="v2",
                   help="the agent's reply texts (answers/, codec corpus, training replies): v1 "
                        "short phrases ('green.', the shipped model's) or v2 sentences ('The "
                        "square is green.', DEMO_WORLD.md version 2, which also asks 'What "
                        "shape is in the middle?') (default: %(default)s)")
    d.add_argument("--question-voice", choices=DATA_QUESTION_VOICES, default="mix",
                   help="who asks: mix = train/val questions by espeak-ng, flite and Festival voices, rate "
                        "and pitch changed, some in a reverberant room (test: held-out espeak-ng "
                        "voices); espeak = espeak-ng voices only (version 1); piper = the "
                        "natural-voice test: test questions by Piper en_US-joe-medium, a "
                        "test-only dataset (--train and --val default to 0 and must stay 0; "
                        "the agent's answers/ are rendered, no codec corpus) "
                        "(default: %(default)s)")
    d.set_defaults(func=cmd_data)

    # commands implemented by a module with cheap imports exposing add_arguments(p) and run(args)
    for name, module, text in [("live", "app.live_cli", "desktop live conversation (Gradio)"),
                               ("serve", "app.server_cli", "websocket server + browser client"),
                               ("replay", "app.replay_cli", "replay a recorded session through the engine"),
                               ("record", "app.record_cli", "record a session from the local camera and microphone"),
                               ("train", "lab.train_cli", "train the codec or the fusion model"),
                               ("eval", "lab.eval_cli", "evaluate on the demo world's test split")]:
        s = sub.add_parser(name, help=text, description=text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            s.set_defaults(func=_not_built(name))
            continue
        mod.add_arguments(s)
        s.set_defaults(func=mod.run)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
