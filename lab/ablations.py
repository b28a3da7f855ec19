"""Ablations for `run.py eval --ablations`: a text-only fast path (ground-truth question
spans, greedy text, no engine) and models trained with the same align budget without the
clue aggregator ("mean") or with one modality, beside the unchanged model trained alike (the
control). `lab.eval` adds their table to eval.json."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from speech.constants import SAMPLE_RATE
from .answers import accuracy_table, answers_match, question_events, session_dirs

ABLATION_NAMES = ("mean", "vision", "audio")
ABLATION_STEPS = 500                     # align steps of every ablation run (and the control)


def encode_session_turns(model, session) -> list:
    """`TurnExample`s (CPU features) of a session's ground-truth questions, encoded through
    `SceneEncoder` as the engine does (audio on the session clock, frames through the 5 fps
    sampler); question bounds are the ground truth's, padded like the engine's VAD span."""
    from app.engine import EngineOptions
    from app.session import load_session
    from speech.constants import END_OF_TURN_SILENCE, SAMPLER_FPS
    from vision.camera import Frame as CamFrame, FrameSampler
    from fusion.inputs import SceneEncoder
    from fusion.model import SceneFeatures
    from .trainset import TurnExample
    s = session if hasattr(session, "events") else load_session(session)
    enc, sampler, fi, out = SceneEncoder(model), FrameSampler(SAMPLER_FPS), 0, []
    pad = EngineOptions().question_pad
    for q in sorted(question_events(s), key=lambda e: e["t_end"]):
        q0, q1 = max(0.0, q["t"] - pad), float(q["t_end"])
        end = max(min(int(round((q1 + END_OF_TURN_SILENCE) * SAMPLE_RATE)), len(s.audio)), enc.samples)
        t_lo = q1 - model.config.context_seconds - 1.0
        start = int(np.floor(max(t_lo, 0.0))) * SAMPLE_RATE     # skip what no question needs
        if start > enc.samples:
            enc.reset_to(start)
        times, images = [], []
        while fi < len(s.frames) and s.frames[fi].t < end / SAMPLE_RATE:
            t = s.frames[fi].t                                   # every frame is offered: same
            if sampler.offer(CamFrame(t, None, fi)) and t >= t_lo:  # schedule as the engine's
                times.append(t)
                images.append(s.read_frame(fi))
            fi += 1
        enc.push_frames(times, images)
        enc.push_audio(s.audio[enc.samples:end])
        f = enc.features(q0, min(q1, enc.now))
        out.append(TurnExample(SceneFeatures(**{k: v.cpu() for k, v in vars(f).items()}),
                               q["answer"], q["qtype"], q["group"]))
    return out


def encode_split(model, data, split: str = "test", max_sessions: int | None = None,
                 progress: bool = False) -> list:
    from tqdm import tqdm
    return [ex for d in tqdm(session_dirs(data, split, max_sessions), desc="encoding", unit="session",
                             disable=not progress) for ex in encode_session_turns(model, d)]


def text_answer(model, generator, example) -> str:
    """Greedy reply text for one encoded turn: generation stops at the first audio frame."""
    import torch
    from fusion.generator import AudioFrame, GenerationDone, TextToken
    from fusion.tokens import get_tokenizer
    from .trainset import collate
    p = next(model.parameters())
    ids = []
    with torch.inference_mode():
        for ev in generator.run(model.prefix(collate([example], p.device, p.dtype))):
            if isinstance(ev, TextToken):
                ids.append(ev.token)
            elif isinstance(ev, (AudioFrame, GenerationDone)):
                break
    return get_tokenizer(model.config.tokenizer).decode(ids)


def encoder_fingerprint(model) -> str:
    from speech.codec import state_fingerprint
    return state_fingerprint(model.audio_encoder) + state_fingerprint(model.vision_encoder)


def evaluate_text_only(model_path, data="data/demo", split: str = "test", *, max_sessions: int | None = None,
                       device: str | None = None, examples: list | None = None,
                       max_text_tokens: int = 24, progress: bool = False) -> dict:
    """Answer accuracy of a checkpoint's (or a loaded model's) greedy text replies on the
    split's questions (`accuracy_table`, plus the replies). `examples` (from `encode_split`
    with a model of identical encoders) skips the encoding."""
    from fusion.checkpoint import load_model
    from fusion.generator import GenerationOptions, Generator
    from fusion.model import FusionModel
    model = model_path if isinstance(model_path, FusionModel) else load_model(model_path, device=device)
    if examples is None:
        examples = encode_split(model, data, split, max_sessions, progress)
    gen = Generator(model, None, GenerationOptions(mode="vanilla", max_text_tokens=max_text_tokens,
                                                   max_audio_seconds=0.1))
    rows = []
    for ex in examples:
        text = text_answer(model, gen, ex)
        rows.append({"qtype": ex.qtype, "group": ex.group, "expected": ex.answer, "text": text,
                     "correct": answers_match(text, ex.answer, ex.qtype)})
    name = model_path if not isinstance(model_path, FusionModel) else "(in memory)"
    return {**accuracy_table(rows), "model": str(name), "replies": rows}


def _file_sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_main_run(main_run: Path) -> Path:
    """The main run's encoders checkpoint (the ablations start from it)."""
    enc_file = main_run / "after_encoders.safetensors"
    if not (main_run / "options.json").is_file() or not enc_file.is_file():
        raise FileNotFoundError(f"{main_run} has no options.json + after_encoders.safetensors: train the "
                                f"main model first (`python run.py train fusion --run-dir {main_run}`) or "
                                f"point --train-run at its run directory")
    return enc_file


def check_train_split(data) -> Path:
    train = Path(data) / "train"
    if not (train / "index.json").is_file():
        raise FileNotFoundError(f"--ablation-data {data}: no training split there; render one with "
                                f"`python run.py data --out {data}` (the model card's: --train 2100)")
    return train


def main_run_from_model(model_path, data, run_dir: Path, *, codec: str | None = None,
                        device: str | None = None, progress: bool = True) -> Path:
    """A training run's stand-in for the ablations of a model whose run is gone (the shipped
    one): RUN_DIR/after_encoders.safetensors is the model, options.json the trainer's defaults
    on DATA with `init` = the model (so the ablations take its encoders only, the rest a fresh
    init), cache.pt DATA's training turns encoded with its encoders (the trainer's own
    `encode_turns`, seed 0). Made once; remade when the model, data or codec changes."""
    import shutil
    import torch
    from fusion.checkpoint import codec_location, load_model, save_model
    from .data import TrainShards
    from .train_fusion import FusionTrainOptions
    from .trainset import encode_turns
    check_train_split(data)
    source = {"model_sha256": _file_sha256(Path(model_path)), "data": str(Path(data).resolve()),
              "codec": str(codec or codec_location(model_path))}
    if _read_json(run_dir / "source.json") != source and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "source.json").write_text(json.dumps(source, indent=1))
    o = FusionTrainOptions(data=str(data), codec=source["codec"], run_dir=str(run_dir), out=None,
                           init=str(model_path), stages=("align",), device=device)
    (run_dir / "options.json").write_text(json.dumps({**asdict(o), "world_size": 1}, indent=2))
    if (run_dir / "after_encoders.safetensors").is_file() and (run_dir / "cache.pt").is_file():
        return run_dir                                              # made before: nothing to load
    model = load_model(model_path, device=device).float()
    if not (run_dir / "after_encoders.safetensors").is_file():
        save_model(model, run_dir / "after_encoders.safetensors")
    if not (run_dir / "cache.pt").is_file():
        t0 = time.perf_counter()
        shards = TrainShards(Path(data) / "train")
        if progress:
            print(f"encoding the {len(shards)} training turns of {data} with {model_path}'s encoders")
        model.eval()
        examples = encode_turns(model, shards, list(range(len(shards))), seed=o.seed, progress=progress)
        torch.save(examples, run_dir / "cache.pt.part")
        (run_dir / "cache.pt.part").replace(run_dir / "cache.pt")   # a killed run leaves no half cache
        (run_dir / "timings.json").write_text(json.dumps({"cache": time.perf_counter() - t0}))
    return run_dir


def shares_encoders_only(main_run: Path) -> bool:
    """A main run started from a trained model (`init`) holds its warm backbone, projectors and
    heads beside the encoders: its ablations take the encoders only."""
    return _read_json(main_run / "options.json").get("init") is not None


def prepare_ablation_run(main_run: Path, run_dir: Path, name: str, steps: int = ABLATION_STEPS) -> dict:
    """Sets up RUN_DIR so `train_fusion` starts the ablation from the main run's encoders:
    after_encoders.safetensors rebuilt with the ablation's config (every weight the two share
    copied) and the main run's feature cache. Returns the training options: the main run's,
    with `steps` align steps. Name "full" is the control: the unchanged model, trained alike;
    when the main run's own align stage had exactly `steps` steps, its checkpoint is that
    control (same init, seed, batches and steps) and is reused instead of retrained. A main run
    started from a trained model (`--init`) holds that model's backbone, projectors and heads
    beside its encoders: only the encoders are copied then, the rest is a fresh seed init, and
    the main run's align is no control."""
    import shutil
    import torch
    from fusion.checkpoint import load_model, save_model
    from fusion.model import FusionModel, is_encoder_key
    from .train_fusion import ABLATIONS, FusionTrainOptions
    enc_file = check_main_run(main_run)
    base = json.loads((main_run / "options.json").read_text())
    encoders_only = shares_encoders_only(main_run)
    source = {"after_encoders_sha256": _file_sha256(enc_file), "main_run": str(main_run),
              "align_steps": steps, "encoders_only": encoders_only}
    had = _read_json(run_dir / "source.json")     # one without "encoders_only" shared all: False
    if had and any(had.get(k, False) != source[k]
                   for k in ("after_encoders_sha256", "align_steps", "encoders_only")):
        shutil.rmtree(run_dir)                     # other encoders or budget: start over
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "after_encoders.safetensors").is_file():
        main = load_model(enc_file, device="cpu")
        torch.manual_seed(base.get("seed", 0))
        model = FusionModel(main.config.replace(**ABLATIONS[name]))
        mine, theirs = model.state_dict(), main.state_dict()
        model.load_state_dict({k: theirs[k] if (is_encoder_key(k) or not encoders_only) and k in theirs
                               and theirs[k].shape == v.shape else v for k, v in mine.items()})
        save_model(model, run_dir / "after_encoders.safetensors")
    main_align = main_run / "after_align.safetensors"
    if (name == "full" and not encoders_only and base.get("align_steps") == steps and main_align.is_file()
            and not (run_dir / "model.safetensors").is_file()):
        for f in ("after_align.safetensors", "align.history.json", "align.loss.png"):
            if (main_run / f).is_file():
                shutil.copyfile(main_run / f, run_dir / f)
        shutil.copyfile(main_align, run_dir / "model.safetensors")
        timings = _read_json(main_run / "timings.json")
        (run_dir / "timings.json").write_text(json.dumps({"align": timings.get("align")}))
    elif (main_run / "cache.pt").is_file() and not (run_dir / "cache.pt").exists():
        (run_dir / "cache.pt").symlink_to((main_run / "cache.pt").resolve())   # read-only, large
    (run_dir / "source.json").write_text(json.dumps(source, indent=1))
    known = set(FusionTrainOptions.__dataclass_fields__)
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in base.items() if k in known}
    kw["batch"] = kw.get("batch", FusionTrainOptions.batch) * int(base.get("world_size", 1))  # 1 process
    # The table scores reply text, which the align stage trains; SFT adds the spoken reply on
    # top. Ablations therefore train align only (`steps` steps, the main run's samples per
    # step) and are compared with the full model trained alike: the same budget, same cache.
    # The auxiliary referent losses read the cell clues the "mean" ablation does not have, so no
    # ablation (nor the control) trains with them: the table compares architectures on the
    # answer loss alone. They start from RUN_DIR's encoders, never from the main run's --init
    # (nor its --vision-cache: the cache is RUN_DIR's own).
    kw.update(run_dir=str(run_dir), out=None, ablation=name, stages=("align",), resume=True,
              align_steps=steps, referent_loss=0.0, init=None, vision_cache=None)
    return kw


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _ablation_workers(o, n: int) -> int:
    import os
    from fusion.checkpoint import pick_device
    if o.ablation_workers is not None:
        return max(1, min(o.ablation_workers, n))
    on_cpu = pick_device(o.device).type == "cpu"      # None/"auto" is CUDA when present
    return max(1, min(n, 2 if on_cpu and (os.cpu_count() or 1) >= 2 else 1))


def worker_options(todo: list, workers: int, cpus: int) -> list:
    """Training options for `workers` processes at once: each gets at most cpus/workers torch
    threads (asking for more oversubscribes the cores: align steps went from 1 s to 7 s, 2 cores,
    2 workers x 2 threads), and only the first shows progress."""
    import dataclasses
    cap = max(1, cpus // workers)
    return [dataclasses.replace(kw, threads=min(kw.threads or cap, cap), progress=kw.progress and i == 0)
            for i, kw in enumerate(todo)]


def _train_all(todo: list, workers: int) -> None:
    """Trains the ablation runs, `workers` at once: single-threaded CPU trainings scale almost
    perfectly over cores, unlike one training's threads (each process gets cores/workers)."""
    import os
    from .train_fusion import train_fusion
    if workers <= 1 or len(todo) <= 1:
        for kw in todo:
            train_fusion(kw)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    todo = worker_options(todo, workers, os.cpu_count() or 1)
    print(f"training {len(todo)} ablation runs, {workers} at once ({todo[0].threads} thread(s) each)")
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for f in [pool.submit(train_fusion, kw) for kw in todo]:
            f.result()                                  # re-raises a worker's error


def run_ablations(options) -> dict:
    """Trains the missing ablation models into ABLATION_ROOT/ablation-<name>/ (the align stage,
    `ablation_steps` steps, from the main run's encoders and feature cache, or with
    `ablation_data` from the evaluated model's encoders on that data), and the full model
    trained alike as the control, and evaluates them and the main model text-only.
    `options`: a `lab.eval.EvalOptions` (not imported here: lab.eval imports this module)."""
    from .train_fusion import FusionTrainOptions
    o, main_run = options, Path(options.train_run)
    if o.random:
        raise ValueError("ablations compare trained models: drop --random")
    if o.ablation_data:
        main_run = main_run_from_model(o.model, o.ablation_data, Path(o.ablation_root) / "ablation-source",
                                       codec=o.codec, device=o.device, progress=o.progress)
    out = {"split": o.split, "models": {}, "training_seconds": {}, "steps": None,
           "main_run": str(main_run), "ablation_data": o.ablation_data,
           "encoders_only": shares_encoders_only(main_run)}
    runs, todo = {}, []
    for name in ("full", *o.ablation_names):
        run_dir = Path(o.ablation_root) / f"ablation-{name}"
        kw = prepare_ablation_run(main_run, run_dir, name, o.ablation_steps)
        kw.update(progress=o.progress, **({"device": o.device} if o.device else {}),
                  **({"threads": o.threads} if o.threads else {}))
        out["steps"] = {k: kw[k] for k in ("align_steps", "batch")}
        if not (run_dir / "model.safetensors").is_file():
            todo.append(FusionTrainOptions(**kw))
        runs[name] = run_dir / "model.safetensors"
    _train_all(todo, _ablation_workers(o, len(todo)))
    for name in runs:
        out["training_seconds"][name] = _read_json(runs[name].parent / "timings.json") or None
    from fusion.checkpoint import load_model
    main_model = load_model(o.model, device=o.device)
    examples = encode_split(main_model, o.data, o.split, o.max_sessions, o.progress)
    fp = encoder_fingerprint(main_model)
    for name, path in [("main", Path(o.model)), *runs.items()]:
        model = main_model if name == "main" else load_model(path, device=o.device)
        same = encoder_fingerprint(model) == fp
        out["models"][name] = evaluate_text_only(model, o.data, o.split, max_sessions=o.max_sessions,
                                                 examples=examples if same else None,
                                                 max_text_tokens=o.max_text_tokens)
        out["models"][name]["model"] = str(path)
    return out
