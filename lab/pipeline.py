"""`python run.py train all`: data -> codec -> fusion -> eval (+ ablations) -> model card.

Everything goes into one run directory, runs/all/ (codec/, fusion/, fusion.safetensors, eval/,
MODEL_CARD.md, sessions/; the data stays in data/demo for other runs); the shipped files in
assets/ change only with `--ship`, which copies the finished run's codec, model, model card
(+ accuracy.png) and example sessions there at the end (a rerun with --ship after a finished
run skips every step and only ships).

Each step is skipped when its output is already there and matches (data: DATA/manifest.json
holds the same options; codec: a saved codec; fusion: finished stages resume), so a rerun
after a crash continues where it stopped. Per-step wall time goes to RUN_DIR/pipeline.json
and into the model card. A few short rendered test sessions are written to RUN/sessions/
for trying `python run.py replay` at once.

`--budget large` is the shipped model's data and step counts in one schedule (3x the training
scenes, 2x the align steps, 2.5x SFT, the referent losses; the shipped model had three more
align rounds on top and a retrained vision encoder, see assets/MODEL_CARD.md), with its own
data/demo-large and run directory runs/all-large.
`--budget small` is a smoke run (tiny presets, a few steps, a tiny world) whose outputs all go
under runs/smoke/, so it never touches the shipped assets.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BUDGETS = {
    "full": {"data": {}, "codec": {"preset": "demo"}, "fusion": {"preset": "demo"}, "eval": {}},
    # the shipped model's data and step counts (3x the training scenes, 2x the align steps,
    # 2.5x SFT) and its referent losses: about 3 h on 2 CPU cores, so not the default (see
    # docs/CONTRIBUTING.md; the losses were measured on a warm round, not from scratch)
    "large": {"data": {"n_train_sessions": 2100}, "codec": {"preset": "demo"},
              "fusion": {"preset": "demo", "align_steps": 4800, "sft_steps": 1500, "referent_loss": 0.5},
              "eval": {}},
    "small": {
        "data": dict(n_train_sessions=8, n_val_sessions=1, n_test_sessions=2, turns_per_session=3,
                     n_codec_sentences=40, n_codec_eval=4),
        "codec": dict(preset="tiny", steps=30, batch=4, eval_every=15, checkpoint_every=15, recognize=False),
        "fusion": dict(preset="tiny", encoder_steps=20, align_steps=30, sft_steps=30, mctp_steps=10,
                       batch=8, aux_batch=8),
        "eval": dict(max_audio_seconds=2.0, ablation_steps=30),
    },
}
# each budget's run directory (everything but the data) and data; "large" keeps the default's intact
RUN_ROOTS = {"full": "runs/all", "large": "runs/all-large", "small": "runs/smoke"}
SMOKE_ROOT = RUN_ROOTS["small"]
BUDGET_DATA = {"full": "data/demo", "large": "data/demo-large"}     # small: RUN/data
RUN_LAYOUT = {"data": "data", "codec_dir": "codec", "run_dir": "fusion", "model_out": "fusion.safetensors",
              "eval_out": "eval", "card_out": "MODEL_CARD.md", "sessions_out": "sessions", "ablation_root": "."}
# what --ship copies from the run into assets/ (the shipped files), and the eval plot the card shows
ASSETS = "assets"
SHIPPED = {"codec_dir": "codec", "model_out": "fusion.safetensors", "card_out": "MODEL_CARD.md",
           "sessions_out": "sessions"}


@dataclass(frozen=True)
class PipelineOptions:
    budget: str = "full"                 # "full" | "large" (the shipped data + steps) | "small" (smoke run)
    data: str | None = None              # None: the budget's default (BUDGET_DATA, small: RUN/data)
    codec_dir: str | None = None
    run_dir: str | None = None
    model_out: str | None = None
    eval_out: str | None = None
    card_out: str | None = None
    sessions_out: str | None = None
    ablation_root: str | None = None
    ablations: bool = True
    recognizer: bool = True
    ship: bool = False                   # at the end, copy the run's model, codec, card, sessions to assets/
    force: bool = False                  # re-render mismatching data, retrain codec and fusion
    agent_voice: str | None = None       # the data's agent voice (tts.parse_voice); None: AGENT_VOICE
    example_sessions: int = 3
    example_turns: int = 2
    seed: int = 0
    workers: int = 2
    device: str | None = None
    threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {self.budget!r}")
        if self.ship and self.budget == "small":
            raise ValueError("--ship replaces the shipped model in assets/ with this run's; a smoke run "
                             "(--budget small) is never shipped: drop --ship or use --budget full")
        if self.example_sessions < 0 or self.example_turns < 1 or self.workers < 1:
            raise ValueError("example_sessions must be >= 0, example_turns and workers >= 1")
        if self.agent_voice is not None:
            from speech.tts import parse_voice
            parse_voice(self.agent_voice)

    def path(self, name: str) -> Path:
        """Where step output `name` goes: as given, else under the budget's run directory
        (never assets/: only ship_assets writes there)."""
        given = getattr(self, name)
        if given:
            return Path(given)
        if name == "data" and self.budget in BUDGET_DATA:
            return Path(BUDGET_DATA[self.budget])
        return Path(RUN_ROOTS[self.budget]) / RUN_LAYOUT[name]


def data_step(o: PipelineOptions) -> bool:
    """Renders the data unless DATA/manifest.json already holds these options. True: rendered."""
    from speech.tts import ESPEAK_AGENT_VOICE, voice_spec
    from .data import DataOptions, main
    data = o.path("data")
    voice = {"agent_voice": o.agent_voice} if o.agent_voice else {}
    want = asdict(DataOptions(seed=o.seed, workers=o.workers, **{**BUDGETS[o.budget]["data"], **voice}))
    manifest = data / "manifest.json"
    if manifest.is_file():
        # data rendered before agent_voice was an option was spoken by the default voice; before
        # reply versions and question-voice modes it was version 1 with espeak-ng questions
        have = {"agent_voice": voice_spec(ESPEAK_AGENT_VOICE), "replies": "v1", "question_voice": "espeak",
                **json.loads(manifest.read_text()).get("options", {})}
        if {k: v for k, v in have.items() if k != "workers"} == {k: v for k, v in want.items() if k != "workers"}:
            return False
    if data.is_dir() and any(data.iterdir()) and not o.force:
        raise ValueError(f"{data} holds data rendered with other options (or unfinished); pass --force "
                         f"to re-render it, or choose another --data")
    main(data, progress=o.progress, overwrite=True, **{k: v for k, v in want.items()})
    return True


def write_example_sessions(out, n: int = 3, turns: int = 2, seed: int = 0) -> list[Path]:
    """`n` short test-split sessions (held-out voices and triples) for trying replay."""
    import numpy as np
    from demo import world as W
    from .data import SPLIT_ID, write_session
    out, dirs = Path(out), []
    for i in range(n):
        index = 100_000 + i                       # beyond any test split: new sessions, same rules
        spec = W.sample_session(np.random.default_rng([seed, SPLIT_ID["test"], index]), turns,
                                W.SplitRules("test"))
        d = out / f"demo-{i + 1}"
        if d.exists():
            shutil.rmtree(d)
        write_session(d, spec, W.render_audio(spec, W.question_audio(spec)),
                      {"world": "demo", "split": "test", "seed": seed, "session_index": index,
                       "example": True})
        dirs.append(d)
    return dirs


def check_codec_voice(codec_dir: Path, data: Path) -> None:
    """Refuses to reuse a codec trained on another voice than the data's agent voice."""
    from speech.tts import ESPEAK_AGENT_VOICE, voice_from_dict, voice_spec
    from .train_codec import corpus_voice, resolve_corpus
    report = codec_dir / "report.json"
    # codecs trained before the report named the voice were all trained on espeak-ng's
    trained = voice_from_dict(json.loads(report.read_text()).get("voice", ESPEAK_AGENT_VOICE.to_dict())) \
        if report.is_file() else ESPEAK_AGENT_VOICE
    speaks = corpus_voice(resolve_corpus(data))
    if trained != speaks:
        raise ValueError(f"the codec in {codec_dir} was trained on the voice {voice_spec(trained)} but "
                         f"{data} speaks its answers with {voice_spec(speaks)}; pass --force to retrain "
                         f"it, or choose another --codec-dir")


def _set_aside(run_dir: Path) -> None:
    """Moves an earlier fusion run out of the way (kept as RUN_DIR.old-<time>, never deleted)."""
    if not run_dir.is_dir():
        return
    if any(run_dir.glob("after_*.safetensors")) or (run_dir / "cache.pt").is_file():
        dest = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(dest)
        print(f"(fusion starts over: the earlier run {run_dir} was moved to {dest})")


def run_pipeline(o: PipelineOptions) -> dict:
    """Runs the steps in the module doc; returns {"steps_s": ..., "skipped": [...]}."""
    from .eval import EvalOptions, evaluate
    from .model_card import write_model_card
    from .train_codec import CodecTrainOptions, train_codec
    from .train_fusion import FusionTrainOptions, train_fusion
    b = BUDGETS[o.budget]
    run_dir, codec_dir = o.path("run_dir"), o.path("codec_dir")
    prev = run_dir / "pipeline.json"
    prev = json.loads(prev.read_text()) if prev.is_file() else {}
    # a skipped step keeps the time it took when it ran
    log = {"budget": o.budget, "steps_s": dict(prev.get("steps_s", {})) if prev.get("budget") == o.budget else {},
           "skipped": [], "paths": {k: str(o.path(k)) for k in RUN_LAYOUT}}

    def step(name, fn):
        t0 = time.perf_counter()
        if o.progress:
            print(f"\n=== train all: {name} ===")
        done = fn()
        if done is False:
            log["skipped"].append(name)
            if o.progress:
                print(f"({name}: already done, skipped)")
        if done is not False or name not in log["steps_s"]:
            log["steps_s"][name] = round(time.perf_counter() - t0, 1)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "pipeline.json").write_text(json.dumps(log, indent=1))
        return done

    step("data", lambda: data_step(o))
    step("sessions", lambda: write_example_sessions(o.path("sessions_out"), o.example_sessions,
                                                    o.example_turns, o.seed))

    def codec():
        if (codec_dir / "codec.json").is_file() and not o.force:
            check_codec_voice(codec_dir, o.path("data"))
            return False
        kw = {"seed": o.seed, "device": o.device or "cpu", "recognize": o.recognizer,
              **({"threads": o.threads} if o.threads else {}), **b["codec"]}
        train_codec(o.path("data"), codec_dir, CodecTrainOptions(**kw), progress=o.progress)
        return True
    new_codec = step("codec", codec)
    if o.force:
        _set_aside(run_dir)
    elif new_codec and any((run_dir / f"after_{s}.safetensors").is_file() for s in ("sft", "mctp")):
        _set_aside(run_dir)   # audio stages trained on another codec (earlier ones adopt the new one)

    def fusion():
        stages = FusionTrainOptions().stages
        if o.path("model_out").is_file() and all((run_dir / f"after_{s}.safetensors").is_file() for s in stages):
            return False
        train_fusion(FusionTrainOptions(
            data=str(o.path("data")), codec=str(codec_dir), run_dir=str(run_dir), out=str(o.path("model_out")),
            seed=o.seed, device=o.device, threads=o.threads, progress=o.progress, **b["fusion"]))
    step("fusion", fusion)
    step("eval", lambda: evaluate(EvalOptions(
        data=str(o.path("data")), model=str(o.path("model_out")), codec=str(codec_dir),
        out=str(o.path("eval_out")), recognizer=o.recognizer, dnsmos=o.recognizer,  # the eval-only speech checks
        device=o.device, threads=o.threads, ablations=o.ablations, train_run=str(run_dir), ablation_root=str(o.path("ablation_root")),
        progress=o.progress, **b["eval"])) and None)
    step("model card", lambda: write_model_card(o.path("eval_out") / "eval.json", run_dir,
                                                codec_dir / "report.json", o.path("card_out")) and None)
    if o.progress:
        print(f"\ntrain all ({o.budget}): " + ", ".join(f"{k} {v:.0f} s" for k, v in log["steps_s"].items())
              + f"\nmodel {o.path('model_out')}, card {o.path('card_out')}, examples {o.path('sessions_out')}")
    if o.ship:
        shipped = ship_assets(o)
        log["shipped"] = [str(p) for p in shipped]
        (run_dir / "pipeline.json").write_text(json.dumps(log, indent=1))
        if o.progress:
            print(f"shipped into {ASSETS}/: " + ", ".join(p.name for p in shipped))
    elif o.progress:
        print(f"(assets/ unchanged: try it with `python run.py serve --model {o.path('model_out')}`; "
              f"rerun with --ship to replace the shipped model with this one)")
    return log


def ship_assets(o: PipelineOptions, assets=ASSETS) -> list[Path]:
    """Copies the run's codec, model, model card (+ the eval's accuracy.png it shows) and example
    sessions into `assets` (replacing the shipped ones); returns the paths written."""
    assets = Path(assets)
    pairs = [(o.path(k), assets / name) for k, name in SHIPPED.items()]
    plot = o.path("eval_out") / "accuracy.png"
    if plot.is_file():
        pairs.append((plot, assets / "accuracy.png"))
    missing = [str(src) for src, _ in pairs if not src.exists()]
    if missing:
        raise FileNotFoundError(f"--ship: the run is not finished ({', '.join(missing)} missing); "
                                f"run `python run.py train all` to the end first")
    assets.mkdir(parents=True, exist_ok=True)
    for src, dst in pairs:
        tmp = dst.with_name(dst.name + ".shipping")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp)
        if dst.is_dir():
            shutil.rmtree(dst)
        tmp.replace(dst)
    return [dst for _, dst in pairs]


# --- command line (fusion/train_cli.py) ------------------------------------------------------------
def add_pipeline_arguments(p) -> None:
    """Flags of `run.py train all` (besides train_cli's --data/--threads/--device)."""
    p.set_defaults(data=None)
    for a in p._actions:
        if a.dest == "data":
            a.help = "the demo world's data (default: data/demo; large: data/demo-large; small: runs/smoke/data)"
    p.add_argument("--budget", default="full", choices=sorted(BUDGETS),
                   help="full: the 2-hour CPU recipe (default); large: the shipped model's data and step counts, "
                        "3x the scenes, 2x the align steps in one schedule, 2.5x SFT (about 3 h on 2 CPU "
                        "cores); small: a quick smoke run under runs/smoke/")
    p.add_argument("--ship", action="store_true",
                   help="at the end, copy the run's codec, model, model card (+ accuracy.png) and example "
                        "sessions into assets/, replacing the shipped model (default: assets/ untouched; "
                        "after a finished run, rerunning with --ship only ships)")
    run = "RUN = runs/all (large: runs/all-large; small: runs/smoke)"
    p.add_argument("--codec-dir", default=None, help=f"default: RUN/codec, {run}")
    p.add_argument("--run-dir", default=None, help=f"the fusion training run (default: RUN/fusion, {run})")
    p.add_argument("--model-out", default=None, help=f"default: RUN/fusion.safetensors, {run}")
    p.add_argument("--eval-out", default=None, help=f"default: RUN/eval, {run}")
    p.add_argument("--card-out", default=None, help=f"default: RUN/MODEL_CARD.md, {run}")
    p.add_argument("--sessions-out", default=None, help=f"example sessions (default: RUN/sessions, {run})")
    p.add_argument("--ablation-root", default=None,
                   help=f"where the ablation runs go, as ablation-<name>/ (default: RUN, {run})")
    p.add_argument("--no-ablations", action="store_true", help="skip training/evaluating the ablations")
    p.add_argument("--no-recognizer", action="store_true", help="skip the evaluation-only speech checks (Whisper tiny.en, DNSMOS)")
    p.add_argument("--force", action="store_true",
                   help="re-render data rendered with other options, retrain the codec and the fusion model")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data rendering processes (default: %(default)s)")
    p.add_argument("--agent-voice", default=None, metavar="SPEC",
                   help="the agent's voice in the data (see `run.py data --help`; default: en-us+m3:165:50, "
                        "the shipped model's); a codec trained on another voice is refused")


def run_cli(args) -> None:
    import sys
    try:
        o = _options_from_args(args)
        run_pipeline(o)
    except (ValueError, FileNotFoundError) as e:     # bad options, mismatching data or codec
        sys.exit(f"train all: {e}")


def _options_from_args(args) -> PipelineOptions:
    return PipelineOptions(
        budget=args.budget, data=args.data, codec_dir=args.codec_dir, run_dir=args.run_dir,
        model_out=args.model_out, eval_out=args.eval_out, card_out=args.card_out,
        sessions_out=args.sessions_out, ablation_root=args.ablation_root, ablations=not args.no_ablations,
        recognizer=not args.no_recognizer, force=args.force, ship=args.ship, seed=args.seed, workers=args.workers,
        device=args.device, threads=args.threads, agent_voice=args.agent_voice)
