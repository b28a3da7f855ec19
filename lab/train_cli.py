"""`python run.py train codec|fusion`: train the speech codec or the fusion model.

Cheap to import (no torch): the fusion trainer's own flags are added only when `train fusion`
is actually parsed (or its --help shown), so other commands never import it.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

DEFAULT_DATA = "data/demo"
DEFAULT_CODEC_OUT = "runs/codec"          # --out assets/codec replaces the shipped codec


class _LazyParser(argparse.ArgumentParser):
    """A subcommand parser that adds its arguments the first time it is used."""

    def __init__(self, *args, populate=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _ensure(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._ensure()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._ensure()
        return super().format_help()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=DEFAULT_DATA, metavar="DIR",
                   help="data from `python run.py data` (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: codec 2, fusion: the trainer's choice)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cpu)")


def _codec_arguments(p: argparse.ArgumentParser) -> None:
    from lab.codec_gan import GanOptions
    from lab.train_codec import CodecTrainOptions as d  # the class: its defaults, no torch
    _common(p)
    p.add_argument("--out", default=DEFAULT_CODEC_OUT, metavar="DIR",
                   help="where the codec, checkpoint, loss.png and report.json go (default: "
                        "%(default)s; assets/codec replaces the shipped codec)")
    p.add_argument("--preset", default=d.preset, help="codec preset (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="total steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch,
                   help="crops per step (default: %(default)s)")
    p.add_argument("--segment-seconds", type=float, default=d.segment_seconds,
                   help="length of each training crop in seconds (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate (default: {d.lr}; with --adversarial the decoder's, "
                        f"default {GanOptions.lr})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="initialisation and crop seed (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, metavar="STEPS",
                   help="quick held-out SI-SNR / mel distance every this many steps "
                        "(default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop training after this many minutes (saving what it has)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt up to --steps")
    p.add_argument("--no-recognizer", action="store_true",
                   help="skip the independent recogniser (Whisper tiny.en) in report.json")
    p.add_argument("--make-corpus", type=int, default=None, metavar="N",
                   help="when DATA has no codec corpus, speak N training sentences (and N/10 "
                        "held-out ones) into DATA/codec first")
    g = p.add_argument_group("adversarial decoder fine-tuning (the codes stay the same)")
    g.add_argument("--adversarial", action="store_true",
                   help="fine-tune the decoder of the codec in --init against EnCodec's "
                        "multi-scale STFT discriminator; its encoder and codebooks stay frozen, "
                        "so a fusion model trained on --init's codes keeps working (--model)")
    g.add_argument("--init", metavar="DIR", default=None,
                   help="the trained codec whose decoder --adversarial fine-tunes")
    g.add_argument("--disc-filters", type=int, default=GanOptions.disc_filters,
                   help="discriminator width (default: %(default)s; EnCodec: 32, ~2x slower on a CPU)")
    g.add_argument("--model", metavar="FUSION", default=None,
                   help="a fusion checkpoint trained on --init's codec: written to "
                        "OUT/fusion.safetensors bound to the new codec (tensors unchanged)")


def _fusion_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    if importlib.util.find_spec("lab.train_fusion") is None:
        p.set_defaults(fusion_missing=True)
        return
    from lab.train_fusion import add_fusion_arguments
    add_fusion_arguments(p)


def _pipeline_arguments(p: argparse.ArgumentParser) -> None:
    from lab.pipeline import add_pipeline_arguments  # cheap: no torch at import
    _common(p)
    add_pipeline_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="{codec,fusion,all}",
                           parser_class=_LazyParser)
    sub.add_parser("codec", help="train the speech codec on the agent's voice",
                   description="train the speech codec on the agent's voice",
                   populate=_codec_arguments)
    sub.add_parser("fusion", help="train the fusion model (needs a trained codec)",
                   description="train the fusion model (needs a trained codec)",
                   populate=_fusion_arguments)
    sub.add_parser("all", help="data -> codec -> fusion -> eval (+ ablations) -> model card",
                   description="data -> codec -> fusion -> eval (+ ablations) -> model card, into "
                               "the run directory runs/all/; assets/ (the shipped model) changes only "
                               "with --ship; finished steps are skipped (--budget small: a quick "
                               "smoke run)",
                   populate=_pipeline_arguments)


def run(args) -> None:
    if args.what == "fusion":
        return _run_fusion(args)
    if args.what == "all":
        from lab.pipeline import run_cli
        return run_cli(args)
    from pathlib import Path

    from lab.train_codec import (CodecTrainOptions, make_codec_corpus, resolve_corpus,
                                    train_codec)
    data = Path(args.data)
    try:
        resolve_corpus(data)
    except FileNotFoundError:
        if not args.make_corpus:
            raise SystemExit(f"train codec: no codec corpus under {data}: run `python run.py "
                             f"data --out {data}` first, or add --make-corpus 1500")
        print(f"speaking {args.make_corpus} sentences into {data / 'codec'} ...")
        make_codec_corpus(data / "codec", args.make_corpus, args.seed)
    if args.adversarial or args.init or args.model:
        return _run_adversarial(args, data)
    try:
        o = CodecTrainOptions(preset=args.preset, steps=args.steps, batch=args.batch,
                              segment_seconds=args.segment_seconds, seed=args.seed,
                              lr=CodecTrainOptions.lr if args.lr is None else args.lr,
                              eval_every=args.eval_every, time_limit_minutes=args.time_limit,
                              threads=args.threads or CodecTrainOptions.threads,
                              device=args.device or "cpu", recognize=not args.no_recognizer)
        result = train_codec(data, args.out, o, progress=True, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train codec: {e}")
    _summary(result, args.out)


def _summary(result, out) -> None:
    """What a codec run (trained or fine-tuned) measured on held-out speech."""
    from pathlib import Path
    rep = result.report.get("heldout", {})
    print(f"codec saved to {result.codec_dir} after {result.steps} steps "
          f"({result.wall_seconds / 60:.1f} min this run); held-out SI-SNR "
          f"{rep.get('si_snr_db')} dB, mel distance {rep.get('mel_distance')}")
    for name, r in rep.get("recognizer", {}).items():
        if "original" in r:
            print(f"  recogniser on {name} ({r['n']}): original "
                  f"{r['original']['utterance_accuracy']:.0%}, reconstructed "
                  f"{r['reconstructed']['utterance_accuracy']:.0%} of utterances")
    for name, q in rep.get("dnsmos_ovrl", {}).items():
        print(f"  DNSMOS on {name}: " + ", ".join(f"{k} {v}" for k, v in q.items()))
    print(f"report: {Path(out) / 'report.json'}, curves: {Path(out) / 'loss.png'}")


def _run_adversarial(args, data) -> None:
    """`train codec --adversarial --init DIR [--model FUSION]`."""
    from pathlib import Path

    from lab.codec_gan import GanOptions, finetune_decoder
    if not (args.adversarial and args.init):
        sys.exit("train codec: --init and --model go with --adversarial, which needs --init DIR "
                 "(the trained codec whose decoder it fine-tunes)")
    try:
        o = GanOptions(steps=args.steps, batch=args.batch, segment_seconds=args.segment_seconds,
                       lr=GanOptions.lr if args.lr is None else args.lr, seed=args.seed,
                       disc_filters=args.disc_filters, eval_every=args.eval_every,
                       time_limit_minutes=args.time_limit, threads=args.threads or 2,
                       device=args.device or "cpu", recognize=not args.no_recognizer)
        if args.model:   # before training: a model of another codec is refused at once
            from fusion.checkpoint import check_compatible, read_header
            from speech.codec import load_codec
            check_compatible(read_header(args.model)[0], load_codec(args.init))
        result = finetune_decoder(args.init, data, args.out, o, progress=True, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:   # CheckpointError is a ValueError
        sys.exit(f"train codec: {e}")
    _summary(result, args.out)
    if args.model:
        from fusion.checkpoint import CheckpointError, rebind_codec
        try:
            out = rebind_codec(args.model, load_codec(result.codec_dir),
                               Path(args.out) / "fusion.safetensors",
                               old_codec=load_codec(args.init))
        except CheckpointError as e:
            sys.exit(f"train codec: {e}")
        print(f"{args.model} bound to the new codec: {out}")


def _run_fusion(args) -> None:
    if getattr(args, "fusion_missing", False):
        sys.exit("`run.py train fusion` is not built yet in this checkout "
                 "(fusion/train_fusion.py is missing).")
    module = importlib.import_module("lab.train_fusion")
    runner = getattr(module, "run_fusion_cli", None) or getattr(module, "run_fusion", None)
    if runner is None:
        sys.exit("fusion/train_fusion.py has no run_fusion_cli(args); `run.py train fusion` "
                 "cannot start it")
    runner(args)
