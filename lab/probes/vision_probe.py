"""Can a vision encoder read the test split's held-out colour-shape-slot triples?

Pretrains a demo-preset vision encoder alone on the slot labels (or loads one from a fusion
checkpoint with --load and --steps 0), then scores it on 1500 test-split frames that each hold a
held-out triple: its own slot heads, and a joint 13-class linear probe fitted on 3000 training
frames (what a downstream model trained on the training split could read). Per slot, "held" is
the held-out objects and "other" every other object. One thread, ~4.5 min for 1200 steps here.

    python -m lab.probes.vision_probe --heads factorised --pos-emb 0 --shift 20
    python -m lab.probes.vision_probe --load runs/X/after_encoders.safetensors --steps 0
"""
import argparse
import json
import time
from dataclasses import replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from demo import world as W
from fusion.layers import column_means
from lab.pretrain import augment_frame
from lab.trainset import OBJECT_CLASSES, frame_labels
from vision.encoder import VISION_PRESETS, build_vision_encoder, preprocess

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--pos-emb", type=int, choices=(0, 1), default=1, help="position embedding (default: %(default)s)")
p.add_argument("--heads", default="joint", choices=("joint", "factorised"))
p.add_argument("--shift", type=float, default=0.0, help="max sideways frame shift, px at 320x240")
p.add_argument("--gray", type=float, default=0.0, help="share of grayscale frames (they train the shape head only)")
p.add_argument("--steps", type=int, default=1200)
p.add_argument("--batch", type=int, default=24)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default=None, help="save the trained encoder's state dict here")
p.add_argument("--load", default=None, help="score the vision encoder of this fusion checkpoint")
a = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(a.seed)
vc = replace(VISION_PRESETS["demo"], pos_emb=bool(a.pos_emb))
enc = build_vision_encoder(vc)
if a.load:
    from fusion.checkpoint import load_model
    m = load_model(a.load).float(); vc = m.config.vision; enc = m.vision_encoder
D = vc.width
colour = [0] + [1 + list(W.COLORS).index(n.split()[0]) for n in OBJECT_CLASSES[1:]]
shape = [0] + [1 + list(W.SHAPES).index(n.split()[1]) for n in OBJECT_CLASSES[1:]]
colour, shape = torch.tensor(colour), torch.tensor(shape)
head = torch.nn.Linear(D, (13 if a.heads == "joint" else 5 + 4) + 1)
opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=1e-3)
rules_tr, rules_te = W.SplitRules("train"), W.SplitRules("test", heldout_combo_prob=1.0)


def scene(rng, rules):
    objs = W._sample_objects(rng, rules)
    pulses = ()
    if rng.random() < 0.3:
        o = objs[rng.integers(len(objs))]
        pulses = (W.Pulse(o.slot, 0.0, 1.0, float(rng.uniform(*W.PULSE_SCALE)),
                          int(rng.integers(*W.PULSE_BRIGHTEN))),)
    return W.Scene(W._sample_background(rng), objs, (), pulses, None)


def frame(rng, rules, shift=0.0):
    sc = scene(rng, rules)
    img = augment_frame(W.render_frame(sc, 0.5), rng, shift)
    c, _ = frame_labels(sc, 0.5)
    return img, c


def cols(x):
    return column_means(enc(x), vc.grid[1])                         # (B, 3, D)


rng = np.random.default_rng(a.seed)
t0 = time.time()
for step in range(a.steps):
    fr = [frame(rng, rules_tr, a.shift) for _ in range(a.batch)]
    imgs = [f[0] for f in fr]
    gray = torch.tensor([rng.random() < a.gray for _ in fr])
    for i, g in enumerate(gray):
        if g:
            imgs[i] = cv2.cvtColor(cv2.cvtColor(imgs[i], cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    cls = torch.tensor([f[1] for f in fr])                          # (B, 3)
    out = head(cols(preprocess(imgs, vc)))
    if a.heads == "joint":
        w = (~gray).float()[:, None].expand(-1, 3).flatten()
        loss = (F.cross_entropy(out[..., :13].flatten(0, 1), cls.flatten(), reduction="none") * w).mean()
    else:
        lc = F.cross_entropy(out[..., :5].flatten(0, 1), colour[cls].flatten(), reduction="none")
        w = (~gray).float()[:, None].expand(-1, 3).flatten()
        ls = F.cross_entropy(out[..., 5:9].flatten(0, 1), shape[cls].flatten())
        loss = (lc * w).mean() + ls
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 200 == 0:
        print(step, round(loss.item(), 4), round(time.time() - t0), flush=True)

enc.eval()


@torch.no_grad()
def feats(n, rules, seed):
    r = np.random.default_rng(seed)
    X, Y = [], []
    for i in range(0, n, 50):
        fr = [frame(r, rules) for _ in range(50)]
        X.append(cols(preprocess([f[0] for f in fr], vc)))
        Y.append(torch.tensor([f[1] for f in fr]))
    return torch.cat(X), torch.cat(Y)


Xtr, Ytr = feats(3000, rules_tr, 123)
Xte, Yte = feats(1500, rules_te, 456)
with torch.no_grad():
    out = head(Xte)
if a.heads == "joint":
    pred = out[..., :13].argmax(-1)
    right = pred == Yte
else:
    right = (out[..., :5].argmax(-1) == colour[Yte]) & (out[..., 5:9].argmax(-1) == shape[Yte])
# linear probe, joint 13 classes, per column shared
probe = torch.nn.Linear(D, 13)
po = torch.optim.AdamW(probe.parameters(), lr=1e-2)
for it in range(300):
    l = F.cross_entropy(probe(Xtr).flatten(0, 1), Ytr.flatten())
    po.zero_grad(); l.backward(); po.step()
with torch.no_grad():
    pright = probe(Xte).argmax(-1) == Yte
held = {(c, s, p) for c, s, p in W.HELDOUT_TRIPLES}
res = {}
for j, slot in enumerate(W.SLOTS):
    hm = torch.tensor([(OBJECT_CLASSES[k].split()[0], OBJECT_CLASSES[k].split()[1], slot) in held
                       if k else False for k in Yte[:, j].tolist()])
    om = (Yte[:, j] > 0) & ~hm
    res[slot] = {"head_held": round(right[hm, j].float().mean().item(), 3),
                 "head_other": round(right[om, j].float().mean().item(), 3),
                 "probe_held": round(pright[hm, j].float().mean().item(), 3),
                 "probe_other": round(pright[om, j].float().mean().item(), 3), "n_held": int(hm.sum())}
print(json.dumps({"args": vars(a), "res": res, "secs": round(time.time() - t0)}, indent=1))
if a.out:
    torch.save(enc.state_dict(), a.out)
