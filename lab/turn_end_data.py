"""Examples for the end-of-turn predictor (speech/turn_end.py), rendered from the demo world.

Each example is the microphone audio up to a moment the engine would ask the predictor:
a short silence after the user's last word so far. One-turn sessions are sampled with the
version-2 hesitation rate (HESITATION_PROB_V2) and rendered with `demo.world.render_audio`
(beeps, background noise, speech levels as in the world); per turn:

- complete (label 1): up to the end of the question + silence;
- hesitation (label 0): a hesitant question up to the start of its pause + silence;
- boundary (label 0): the question cut at each other word boundary: the words before it
  synthesised on their own (as a hesitation's first part is), placed at the question start
  over the scene without speech, + silence.

Stored as int16 audio ending EXTRA_SILENCE[1] s after the cut, so training can draw the
silence from EXTRA_SILENCE and evaluation uses TURN_END_PAUSE.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, replace

import numpy as np

from demo import world as W
from demo.hesitation import HESITATION_PROB_V2, n_boundaries, split_words
from speech.audio import float_to_pcm16
from speech.constants import PCM16_MAX, SAMPLE_RATE
from speech.tts import synthesize_cached

EXTRA_SILENCE = (0.15, 0.3)        # s of silence after the cut drawn in training
SPLIT_ID = {"train": 0, "val": 1, "test": 2}
KINDS = ("complete", "hesitation", "boundary")


@dataclass
class Examples:
    audio: np.ndarray              # (N, L) int16: audio up to cut + EXTRA_SILENCE[1]
    label: np.ndarray              # (N,) 1 = complete
    kind: np.ndarray               # (N,) index into KINDS
    turn: np.ndarray               # (N,) the turn (session) index it comes from

    def __len__(self) -> int:
        return len(self.label)

    def windows(self, idx, silence, window_samples: int) -> np.ndarray:
        """Float windows (B, window_samples) ending `silence` s (scalar or (B,)) after cut."""
        idx = np.asarray(idx)
        back = np.round((EXTRA_SILENCE[1] - np.broadcast_to(silence, idx.shape))
                        * SAMPLE_RATE).astype(int)
        L = self.audio.shape[1]
        if window_samples + back.max() > L:
            raise ValueError(f"examples hold {L} samples; a {window_samples}-sample window "
                             f"{back.max()} samples before their end does not fit")
        out = np.stack([self.audio[i, L - b - window_samples:L - b] for i, b in zip(idx, back)])
        return out.astype(np.float32) / PCM16_MAX

    def save(self, path) -> None:
        np.savez(path, audio=self.audio, label=self.label, kind=self.kind, turn=self.turn)

    @classmethod
    def load(cls, path) -> "Examples":
        with np.load(path) as z:
            return cls(z["audio"], z["label"], z["kind"], z["turn"])


def _cut(audio: np.ndarray, t_cut: float, length: int) -> np.ndarray:
    """`length` samples ending EXTRA_SILENCE[1] s after t_cut, zeros before the session."""
    end = int(round((t_cut + EXTRA_SILENCE[1]) * SAMPLE_RATE))
    x = audio[max(0, end - length):end]
    return np.concatenate([np.zeros(length - len(x), np.float32), x])


def turn_examples(spec: W.SessionSpec, length: int, synth=synthesize_cached):
    """[(int16 audio (length,), label, kind)] of a one-turn session (module docstring)."""
    (turn,) = spec.turns
    qa = W.question_audio(spec, synth)
    mic = W.render_audio(spec, qa)
    out = [(_cut(mic, turn.t_q1, length), 1, "complete")]
    h = turn.hesitation
    if h is not None:
        out.append((_cut(mic, h.t0, length), 0, "hesitation"))
    scene = W.render_audio(spec, [np.zeros_like(q) for q in qa])   # beeps + noise, no speech
    a = int(round(turn.t_q0 * SAMPLE_RATE))
    for k in range(1, n_boundaries(turn.question.text) + 1):
        if h is not None and k == h.words:
            continue
        head = np.asarray(synth(split_words(turn.question.text, k)[0], turn.voice), np.float64)
        gain = 10 ** (turn.speech_dbfs / 20) / max(float(np.sqrt(np.mean(head ** 2))), 1e-12)
        x = scene.astype(np.float64)
        x[a:a + len(head)] += head * gain
        x = np.clip(x, -1.0, 1.0).astype(np.float32)
        out.append((_cut(x, (a + len(head)) / SAMPLE_RATE, length), 0, "boundary"))
    return [(float_to_pcm16(x), y, kind) for x, y, kind in out]


def _job(args):
    seed, split, i, length, hesitation_prob = args
    import torch
    torch.set_num_threads(1)       # the TTS resampler: threads only fight over shared cores
    rng = np.random.default_rng([seed, 100 + SPLIT_ID[split], i])
    rules = W.SplitRules(split, hesitation_prob=hesitation_prob)
    return i, turn_examples(W.sample_session(rng, 1, rules), length)


def make_examples(split: str, n_turns: int, window_seconds: float, *, seed: int = 0,
                  workers: int = 1, hesitation_prob: float = HESITATION_PROB_V2,
                  progress: bool = True, first: int = 0) -> Examples:
    """Examples of one-turn sessions `first` .. `n_turns - 1` of a world split (test:
    held-out voices); session i is the same whatever the range."""
    from tqdm import tqdm
    if split not in SPLIT_ID:
        raise ValueError(f"split must be one of {tuple(SPLIT_ID)}, got {split!r}")
    length = int(round((window_seconds + EXTRA_SILENCE[1] - EXTRA_SILENCE[0]) * SAMPLE_RATE))
    jobs = [(seed, split, i, length, hesitation_prob) for i in range(first, n_turns)]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        it = pool.imap_unordered(_job, jobs) if pool else map(_job, jobs)
        rows = []
        for i, exs in tqdm(it, total=len(jobs), desc=f"turn-end {split}", unit="turn",
                           disable=not progress):
            rows += [(i, *e) for e in exs]
    finally:
        if pool:
            pool.close()
            pool.join()
    rows.sort(key=lambda r: (r[0], KINDS.index(r[3])))      # same order for any worker count
    return Examples(np.stack([r[1] for r in rows]) if rows else np.zeros((0, length), np.int16),
                    np.array([r[2] for r in rows], np.int64),
                    np.array([KINDS.index(r[3]) for r in rows], np.int64),
                    np.array([r[0] for r in rows], np.int64))


def concat(a: Examples, b: Examples) -> Examples:
    return Examples(*(np.concatenate([getattr(a, k), getattr(b, k)]) for k in
                      ("audio", "label", "kind", "turn")))


def subset(ex: Examples, keep) -> Examples:
    """The examples picked by `keep` (a boolean mask or indices)."""
    return replace(ex, audio=ex.audio[keep], label=ex.label[keep], kind=ex.kind[keep],
                   turn=ex.turn[keep])
