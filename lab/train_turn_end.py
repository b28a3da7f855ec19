"""`python -m lab.train_turn_end --out runs/turn_end`: train and score the end-of-turn
predictor (speech/turn_end.py) in the demo world.

Examples come from lab/turn_end_data.py (training voices for train and val, the held-out
voices for test), cached in OUT/examples_SPLIT.npz. Training draws balanced batches (half
complete, half cut at a word boundary) with 0.15-0.3 s of silence after the cut; scoring
asks at TURN_END_PAUSE (0.2 s). OUT gets turn_end.safetensors, turn_end.state.pt (resumable
checkpoint), turn_end.history.json + .loss.png, and report.json: precision and recall of
"complete" at threshold 0.5 and at the threshold chosen on val for at most
`max_false_complete` of incomplete questions called complete (the cut-off rate).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lab.train_loop import LoopOptions, train
from lab.turn_end_data import EXTRA_SILENCE, KINDS, Examples, concat, make_examples, subset
from speech.constants import TURN_END_PAUSE
from speech.turn_end import TurnEndConfig, TurnEndNet, TurnEndPredictor, features

MODEL_FILE = "turn_end.safetensors"


@dataclass(frozen=True)
class TurnEndTrainOptions:
    n_train_turns: int = 600       # one-turn sessions; ~6 examples each
    n_val_turns: int = 100
    n_test_turns: int = 150
    steps: int = 1500
    batch: int = 32
    lr: float = 2e-3
    seed: int = 0
    workers: int = 1               # processes rendering examples
    threads: int = 1               # torch threads for training
    max_false_complete: float = 0.03
    config: TurnEndConfig = field(default_factory=TurnEndConfig)

    def __post_init__(self):
        for name, lo in (("n_train_turns", 1), ("n_val_turns", 1), ("n_test_turns", 1),
                         ("steps", 0), ("batch", 2), ("seed", 0), ("workers", 1),
                         ("threads", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"TurnEndTrainOptions.{name} must be an integer >= {lo}, "
                                 f"got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TurnEndTrainOptions.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.max_false_complete < 1.0:
            raise ValueError(f"max_false_complete must be in [0, 1), got "
                             f"{self.max_false_complete}")


# --- training ----------------------------------------------------------------------------
def fit(net: TurnEndNet, ex: Examples, *, steps: int, batch: int, lr: float, seed: int,
        run_dir: Path, progress: bool = True) -> list[dict]:
    """Trains `net` on balanced batches of `ex`; checkpoints in run_dir (resumes from it)."""
    pos, neg = np.flatnonzero(ex.label == 1), np.flatnonzero(ex.label == 0)
    if not len(pos) or not len(neg):
        raise ValueError(f"training needs complete and incomplete examples, got "
                         f"{len(pos)} and {len(neg)}")
    cfg = net.config

    def loss_fn(model, step):
        rng = np.random.default_rng([seed, step])          # resumable: drawn per step
        idx = np.concatenate([rng.choice(pos, batch // 2), rng.choice(neg, batch - batch // 2)])
        x = ex.windows(idx, rng.uniform(*EXTRA_SILENCE, len(idx)), cfg.window_samples)
        y = torch.from_numpy(ex.label[idx]).float()
        return {"loss": F.binary_cross_entropy_with_logits(model(features(x, cfg)), y)}

    opts = LoopOptions(steps=steps, lr=lr, warmup=min(50, steps // 10), log_every=10,
                       ckpt_every=100)
    params = [p for p in net.parameters() if p.requires_grad]
    return train("turn_end", net, params, loss_fn, opts, Path(run_dir), progress=progress)


# --- scoring -------------------------------------------------------------------------------
@torch.inference_mode()
def predict(predictor: TurnEndPredictor, ex: Examples, silence: float = TURN_END_PAUSE,
            chunk: int = 64) -> np.ndarray:
    """P(complete) of every example, asked `silence` s after its cut: (N,)."""
    cfg, out = predictor.config, []
    for a in range(0, len(ex), chunk):
        idx = np.arange(a, min(a + chunk, len(ex)))
        x = features(ex.windows(idx, silence, cfg.window_samples), cfg)
        out.append(torch.sigmoid(predictor.net(x)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def threshold_for(probs: np.ndarray, label: np.ndarray, max_false: float) -> float:
    """The lowest threshold calling at most `max_false` of the incomplete ones complete."""
    neg = np.sort(probs[label == 0])[::-1]
    k = int(np.floor(max_false * len(neg)))               # this many may pass
    return 0.0 if k >= len(neg) else float(np.nextafter(neg[k], 1.0))


def scores(probs: np.ndarray, ex: Examples, threshold: float) -> dict:
    """Precision/recall of "complete" (p >= threshold) and the false-complete rate per kind."""
    said = probs >= threshold
    pos = ex.label == 1
    tp = int(np.sum(said & pos))
    out = {"threshold": round(float(threshold), 4),
           "precision": round(tp / max(1, int(said.sum())), 4),
           "recall": round(tp / max(1, int(pos.sum())), 4),
           "false_complete": round(float(said[~pos].mean()) if (~pos).any() else 0.0, 4)}
    for k, name in enumerate(KINDS[1:], 1):
        m = ex.kind == k
        out[f"false_complete_{name}"] = round(float(said[m].mean()), 4) if m.any() else None
    return out


def auc(probs: np.ndarray, label: np.ndarray) -> float:
    """Probability that a complete example scores above an incomplete one."""
    p, n = probs[label == 1], probs[label == 0]
    return float(((p[:, None] > n[None]).mean() + 0.5 * (p[:, None] == n[None]).mean()))


def evaluate(predictor: TurnEndPredictor, splits: dict[str, Examples],
             max_false: float) -> dict:
    probs = {k: predict(predictor, ex) for k, ex in splits.items()}
    t = threshold_for(probs["val"], splits["val"].label, max_false)
    rep = {}
    for k, ex in splits.items():
        rep[k] = {"examples": {n: int(np.sum(ex.kind == i)) for i, n in enumerate(KINDS)},
                  "auc": round(auc(probs[k], ex.label), 4),
                  "at_0.5": scores(probs[k], ex, 0.5),
                  f"at_val_threshold_{max_false:g}": scores(probs[k], ex, t),
                  f"at_own_threshold_{max_false:g}": scores(
                      probs[k], ex, threshold_for(probs[k], ex.label, max_false))}
    return rep


# --- the run -------------------------------------------------------------------------------
def _examples(out: Path, split: str, n: int, o: TurnEndTrainOptions, progress: bool):
    """The split's examples, from OUT's cache where it has them (more turns: rendered on)."""
    path, meta = out / f"examples_{split}.npz", out / f"examples_{split}.json"
    key = {"n_turns": n, "seed": o.seed, "window_seconds": o.config.window_seconds,
           "extra_silence": list(EXTRA_SILENCE)}
    old = json.loads(meta.read_text()) if path.is_file() and meta.is_file() else {}
    have = old.pop("n_turns", 0)
    ex = None
    if old == {k: v for k, v in key.items() if k != "n_turns"} and have >= 1:
        ex = Examples.load(path)
        if have >= n:
            return subset(ex, ex.turn < n)
    more = make_examples(split, n, o.config.window_seconds, seed=o.seed, workers=o.workers,
                         progress=progress, first=have if ex is not None else 0)
    ex = more if ex is None else concat(ex, more)
    ex.save(path)
    meta.write_text(json.dumps(key))
    return ex


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def train_turn_end(out_dir, o: TurnEndTrainOptions = TurnEndTrainOptions(), *,
                   progress: bool = True) -> dict:
    """Renders (or reuses) the examples, trains, saves OUT/turn_end.safetensors, scores val
    and test; returns report.json's content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(o.threads)
    try:
        t0 = time.perf_counter()
        splits = {s: _examples(out, s, n, o, progress) for s, n in
                  (("train", o.n_train_turns), ("val", o.n_val_turns),
                   ("test", o.n_test_turns))}
        t_data = time.perf_counter() - t0
        torch.manual_seed(o.seed)
        net = TurnEndNet(o.config)
        t0 = time.perf_counter()
        history = fit(net, splits["train"], steps=o.steps, batch=o.batch, lr=o.lr,
                      seed=o.seed, run_dir=out, progress=progress)
        t_train = time.perf_counter() - t0
        predictor = TurnEndPredictor(net)
        predictor.save(out / MODEL_FILE)
        report = {"options": asdict(o), "cpu": _cpu(), "torch_threads": o.threads,
                  "data_seconds": round(t_data, 1), "train_seconds_this_run": round(t_train, 1),
                  "train_seconds_total": round(history[-1]["elapsed_s"], 1) if history else 0,
                  "final_loss": round(float(np.mean([h["loss"] for h in history[-50:]])), 4)
                  if history else None, "asked_after_silence_s": TURN_END_PAUSE,
                  **evaluate(predictor, {k: splits[k] for k in ("val", "test")},
                             o.max_false_complete)}
    finally:
        torch.set_num_threads(threads)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> None:
    d = TurnEndTrainOptions()
    p = argparse.ArgumentParser(prog="python -m lab.train_turn_end", description=__doc__
                                .split("\n\n")[0])
    p.add_argument("--out", default="runs/turn_end", help="output folder (default: %(default)s)")
    for name in ("n_train_turns", "n_val_turns", "n_test_turns", "steps", "batch", "seed",
                 "workers", "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-false-complete", type=float, default=d.max_false_complete)
    a = p.parse_args(argv)
    try:
        o = TurnEndTrainOptions(**{k: v for k, v in vars(a).items() if k != "out"})
    except ValueError as e:
        raise SystemExit(f"train_turn_end: {e}")
    rep = train_turn_end(a.out, o)
    for split in ("val", "test"):
        r = rep[split]
        for key in ("at_0.5", f"at_val_threshold_{o.max_false_complete:g}"):
            s = r[key]
            print(f"{split:4s} {key:22s} thr {s['threshold']:.3f}: precision {s['precision']:.3f}"
                  f" recall {s['recall']:.3f} false complete {s['false_complete']:.3f} "
                  f"(hesitations {s['false_complete_hesitation']})")
    print(f"model: {Path(a.out) / MODEL_FILE}; report: {Path(a.out) / 'report.json'}")


if __name__ == "__main__":
    main()
