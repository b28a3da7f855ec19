"""Quick align-stage experiments on a run's cached features (dev tool, not part of the app).

Trains the fusion parts from scratch on the first 90% of the cached training turns for a few
hundred steps and reports teacher-forced exact-match text accuracy per question type on the
last 10% (held-out sessions), so recipe/architecture variants can be compared in minutes.

    python -m lab.probes.align_probe --run runs/fusion --steps 400 --set pooled_clues=False
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import time
from pathlib import Path

import numpy as np
import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/fusion", help="a fusion run with after_align + cache.pt")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="FusionConfig overrides k=v")
    p.add_argument("--out", default=None)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (as train --amp)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--qtypes", default=None, help="comma-separated question types to train/judge on")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from fusion.checkpoint import read_header
    from fusion.config import preset
    from fusion.model import FusionModel
    from fusion.tokens import get_tokenizer
    from lab.train_fusion import set_trainable, stage_modules
    from lab.trainset import collate, pad_replies, reply_tokens
    run = Path(a.run)
    cfg, _ = read_header(run / "after_align.safetensors")
    over = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in a.set)}
    model = FusionModel(preset("demo", cfg.codec, **over))
    t0 = time.time()
    ex = torch.load(run / "cache.pt", weights_only=False)
    print(f"cache {len(ex)} turns loaded in {time.time() - t0:.0f}s", flush=True)
    n_tr = int(len(ex) * 0.9)
    train, val = ex[:n_tr], ex[n_tr:]
    if a.qtypes:
        keep = set(a.qtypes.split(","))
        train, val = [e for e in train if e.qtype in keep], [e for e in val if e.qtype in keep]
    tok = get_tokenizer(cfg.tokenizer)
    lay = model.layout
    replies = {e.answer: reply_tokens(lay, tok, e.answer, None) for e in ex}
    params = set_trainable(model, stage_modules(model, "align"))
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98), fused=True)

    def batch(exs):
        reply, lens = pad_replies([replies[e.answer] for e in exs])
        return collate(exs), reply, lens

    @torch.no_grad()
    def evaluate():
        model.eval()
        ok = collections.defaultdict(list)
        for i in range(0, len(val), 64):
            exs = val[i:i + 64]
            f, reply, lens = batch(exs)
            pre = model.prefix(f)
            x, km, tgt = model.pack(pre, reply, lens)
            h = model.backbone(x, 0, None, km)
            valid = (tgt >= 0) & (tgt < lay.n_text)
            pred = model.text_logits(h).argmax(-1)
            good = ((pred == tgt) | ~valid).all(1)
            for e, g in zip(exs, good.tolist()):
                ok[e.qtype].append(g)
        model.train()
        per = {k: float(np.mean(v)) for k, v in sorted(ok.items())}
        allv = [g for v in ok.values() for g in v]
        return float(np.mean(allv)), per

    hist = []
    t0 = time.time()
    for step in range(1, a.steps + 1):
        lr = a.lr * min(1.0, step / 30) * 0.5 * (1 + np.cos(np.pi * min(1.0, step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng((0, step))
        f, reply, lens = batch([train[i] for i in rng.choice(len(train), a.batch, replace=False)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.amp):
            L = model(f, reply, lens, mctp=False)
        opt.zero_grad(set_to_none=True)
        L.text.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append(float(L.text.detach()))
        if step % 50 == 0:
            print(f"step {step} loss {np.mean(hist[-50:]):.3f} {time.time() - t0:.0f}s", flush=True)
        if a.eval_every and step % a.eval_every == 0 and step < a.steps:
            acc, per = evaluate()
            print(f"  val@{step} {acc:.3f} " + " ".join(f"{k}={v:.2f}" for k, v in per.items()), flush=True)
    acc, per = evaluate()
    print(f"VAL {acc:.3f} " + " ".join(f"{k}={v:.2f}" for k, v in per.items()), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"set": a.set, "steps": a.steps, "val": acc, "per": per,
                                           "loss": hist, "seconds": time.time() - t0}))


if __name__ == "__main__":
    main()
