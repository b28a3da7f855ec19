"""Training examples from the demo world's shards.

- Auxiliary labels for pretraining the encoders (per frame: what sits in each slot and
  whether it pulses; per audio frame: beep pitch and speech; per question: its words).
- Cached turn features: once the encoders are frozen, every training turn is encoded ONCE
  through the runtime path (`SceneEncoder`: 1 s audio chunks on the session clock, frames
  through the 5 fps sampler) and kept, so later stages train on the cache.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from speech.constants import (AUDIO_FEATURE_RATE, DEMO_WORLD_FPS, END_OF_TURN_SILENCE,
                              QUESTION_PAD, SAMPLE_RATE, SAMPLER_FPS)
from vision.camera import Frame as CamFrame, FrameSampler

from demo import world as W
from fusion.model import SceneFeatures

# --- auxiliary labels ----------------------------------------------------------------------------
OBJECT_CLASSES = ["empty"] + [f"{c} {s}" for c in W.COLORS for s in W.SHAPES]  # 13 per slot
BEEP_CLASSES = ("none", "low", "high")


def question_vocab() -> list[str]:
    words = set()
    for _, (_, q, _) in W.QTYPES.items():
        words.update(words_of(q.replace("{c}", "").replace("{s}", "").replace("{p}", "")))
    words.update(W.COLORS), words.update(W.SHAPES), words.update(W.SLOTS)
    return sorted(words)


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def frame_labels(scene: W.Scene | None, t: float) -> tuple[list[int], list[int]]:
    """Per slot (left, middle, right): object class index and pulsing flag at time t."""
    cls, pulse = [0, 0, 0], [0, 0, 0]
    if scene is not None:
        for o in scene.objects:
            i = W.SLOTS.index(o.slot)
            cls[i] = OBJECT_CLASSES.index(f"{o.color} {o.shape}")
            pulse[i] = int(W.active_pulse(scene, o.slot, t) is not None)
    return cls, pulse


def audio_frame_labels(spec: W.SessionSpec, t0: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per encoder frame (50 Hz, starting at t0): beep class and speech flag."""
    tc = t0 + (np.arange(n) + 0.5) / AUDIO_FEATURE_RATE
    beep = np.zeros(n, np.int64)
    speech = np.zeros(n, np.int64)
    for tr in spec.turns:
        for b in tr.scene.beeps:
            on = (tc >= b.t0) & (tc < b.t0 + b.dur)
            beep[on] = 2 if b.freq > 1000 else 1
        speech[(tc >= tr.t_q0) & (tc < tr.t_q1)] = 1
    return beep, speech


# --- replies -------------------------------------------------------------------------------------
def reply_tokens(layout, tokenizer, answer: str, codes: torch.Tensor | None) -> torch.Tensor:
    """`ASSISTANT text EOT [audio EOA]` for one answer; codes (n_q, F) or None (text only)."""
    text = tokenizer.encode(" " + answer.strip())
    seq = [layout.assistant, *text, layout.eot]
    if codes is not None:
        seq += layout.codes_to_tokens(codes).tolist() + [layout.eoa]
    return torch.tensor(seq, dtype=torch.long)


def pad_replies(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reply token sequences -> (B, R) right-padded ids and (B,) lengths."""
    lens = torch.tensor([len(s) for s in seqs])
    reply = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
    for b, s in enumerate(seqs):
        reply[b, :len(s)] = s
    return reply, lens


# --- cached turn features --------------------------------------------------------------------------
@dataclass
class TurnExample:
    feats: SceneFeatures       # batch 1, CPU, float16 storage
    answer: str                # the reply text to train on (the data's version: TrainShards.replies)
    qtype: str
    group: str


def _to_storage(f: SceneFeatures) -> SceneFeatures:
    return SceneFeatures(**{k: (v.cpu().half() if v.is_floating_point() and k in ("question", "audio", "frames")
                                else v.cpu()) for k, v in vars(f).items()})


# Question bounds as the engine's VAD finds them, relative to the true ones (silero-vad on 96
# val turns: start +0.077 s mean, 5-95% [+0.007, +0.243]; end +0.053 s, [-0.021, +0.103]); the
# engine keeps QUESTION_PAD = 0.05 s before the start. Training draws from these ranges.
QUESTION_START_JITTER = (-0.05, 0.20)   # s added to (true start - QUESTION_PAD)
QUESTION_END_JITTER = (-0.04, 0.12)     # s added to the true end


def question_bounds(rng, turn: W.TurnSpec) -> tuple[float, float]:
    """A turn's question span as the engine's VAD might find it (QUESTION_*_JITTER drawn from
    `rng`, start then end), QUESTION_PAD before the start included."""
    q0 = max(0.0, turn.t_q0 - QUESTION_PAD + rng.uniform(*QUESTION_START_JITTER))
    return q0, turn.t_q1 + rng.uniform(*QUESTION_END_JITTER)


def question_gaps(rng, turn: W.TurnSpec) -> list[tuple[float, float]]:
    """A hesitation's pause as the engine leaves it out of the question (app/engine.py): from
    the VAD's speech end (QUESTION_END_JITTER after the pause starts) to QUESTION_PAD before
    the VAD's restart (QUESTION_START_JITTER after the pause ends); [] without a hesitation
    (no draw from `rng`: fluent data encodes as before)."""
    h = turn.hesitation
    if h is None:
        return []
    a = h.t0 + rng.uniform(*QUESTION_END_JITTER)
    b = h.t1 - QUESTION_PAD + rng.uniform(*QUESTION_START_JITTER)
    return [(a, b)] if b > a else []


@torch.inference_mode()
def encode_turns(model, shards, turn_ids, *, seed: int = 0, progress: bool = True,
                 vision_from: dict[int, TurnExample] | None = None) -> list[TurnExample]:
    """Encodes the given global turns through `SceneEncoder` (the runtime path). Question
    bounds vary as the VAD's do (QUESTION_*_JITTER); frames come at 10 fps with a random phase
    through the 5 fps sampler. Randomness is seeded per session, so any split of the turns
    over processes gives the same features. `vision_from` (turn -> example encoded with the
    same seed and vision encoder): frames taken from it, not rendered and encoded again
    (three quarters of the time)."""
    from fusion.inputs import SceneEncoder
    by_session: dict[int, list[int]] = {}
    for i in turn_ids:
        by_session.setdefault(shards.session_of(i), []).append(i)
    out: dict[int, TurnExample] = {}
    bar = tqdm(total=len(turn_ids), desc="encoding turns", unit="turn", disable=not progress)
    size = W.DEMO_FRAME_SIZE
    for s, turns in by_session.items():
        rng = np.random.default_rng((seed, s))
        spec = shards.specs[s]
        mic = shards.mic(s)
        enc = SceneEncoder(model)
        sampler = FrameSampler(SAMPLER_FPS)
        phase = rng.uniform(0, 1 / DEMO_WORLD_FPS)
        frame_i = 0
        for i in sorted(turns, key=lambda i: shards.turn(i)[1]):
            tr = spec.turns[shards.turn(i)[1]]
            q0, q1 = question_bounds(rng, tr)
            gaps = question_gaps(rng, tr)
            decision = q1 + END_OF_TURN_SILENCE
            t_lo = q1 - model.config.context_seconds - 1.0
            # skip ahead cheaply: nothing before t_lo matters for this turn
            start = max(enc.samples, int(np.floor(max(t_lo, 0)) * SAMPLE_RATE))
            if start > enc.samples:
                enc.reset_to(start)
            while frame_i / DEMO_WORLD_FPS + phase < t_lo:
                frame_i += 1
            end = min(int(decision * SAMPLE_RATE), len(mic))
            times, images = [], []
            while vision_from is None and (t := frame_i / DEMO_WORLD_FPS + phase) < end / SAMPLE_RATE:
                if sampler.offer(CamFrame(t, None, frame_i)):
                    times.append(t)
                    images.append(W.render_frame(spec, t, size))
                frame_i += 1
            enc.push_frames(times, images)                # batched: same features as one by one
            enc.push_audio(mic[enc.samples:end])
            feats = _to_storage(enc.features(q0, min(q1, enc.now), gaps=gaps))
            q = tr.question
            reply = shards.reply(i)               # in the version the data was rendered for
            if vision_from is not None:
                old = vision_from[i]
                assert (old.answer, old.qtype) == (reply, q.qtype), (old.answer, reply, i)
                feats = replace(feats, frames=old.feats.frames, frame_times=old.feats.frame_times,
                                frame_mask=old.feats.frame_mask)
            out[i] = TurnExample(feats, reply, q.qtype, q.type_group)
            bar.update(1)
    bar.close()
    return [out[i] for i in turn_ids]


def collate(examples: list[TurnExample], device=None, dtype=torch.float32) -> SceneFeatures:
    """Pads a list of batch-1 cached features into one batch."""
    fs = [e.feats for e in examples]
    B = len(fs)

    def pad(name, mask_name=None):
        xs = [getattr(f, name)[0] for f in fs]
        T = max(x.shape[0] for x in xs)
        out = xs[0].new_zeros((B, T, *xs[0].shape[1:]))
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, x in enumerate(xs):
            out[b, :len(x)] = x
            mask[b, :len(x)] = True
        return out, mask

    q, _ = pad("question")
    a, am = pad("audio")
    at, _ = pad("audio_times")
    v, vm = pad("frames")
    vt, _ = pad("frame_times")
    f = SceneFeatures(q.to(dtype), torch.cat([f.question_len for f in fs]), a.to(dtype), at, am,
                      v.to(dtype), vt, vm)
    return SceneFeatures(**{k: t.to(device) for k, t in vars(f).items()}) if device else f
