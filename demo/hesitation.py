"""Hesitations (docs/DEMO_WORLD.md, version 2): a question spoken with one pause at a word
boundary ("What color is ... the square?").

The question is synthesised in two parts, split at a word boundary: the words before the
pause (no punctuation: the TTS ends them as a statement) and the rest (with the "?"); they
are joined by 0.3-1.0 s of digital silence. The question still ends at the end of its last
word (`TurnSpec.t_q1`); `Hesitation` records where the pause lies, so an evaluation can tell
an agent that answered inside it (it cut the user off). Off unless `SplitRules.hesitation_prob`
(`run.py data --hesitations 0.25`) asks for it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

HESITATION_PAUSE = (0.3, 1.0)      # s of silence inserted between the two parts
HESITATION_PROB_V2 = 0.25          # "about a quarter of the questions" (the page's rate)


@dataclass(frozen=True)
class Hesitation:
    words: int                     # words spoken before the pause (1 .. n_words - 1)
    t0: float                      # s, absolute: the pause starts (end of the first part)
    t1: float                      # s, absolute: the pause ends (second part starts)

    def __post_init__(self):
        if not isinstance(self.words, int) or self.words < 1:
            raise ValueError(f"Hesitation.words must be an integer >= 1, got {self.words!r}")
        if not self.t1 > self.t0 >= 0:
            raise ValueError(f"Hesitation needs 0 <= t0 < t1, got t0={self.t0}, t1={self.t1}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "Hesitation | None":
        return None if d is None else cls(int(d["words"]), float(d["t0"]), float(d["t1"]))


def split_words(text: str, words: int) -> tuple[str, str]:
    """("What color is", "the square?") for words=3: the text before and after the pause."""
    ws = text.split()
    if not 1 <= words < len(ws):
        raise ValueError(f"a pause after word {words} is not inside {text!r} "
                         f"({len(ws)} words): pick 1 .. {len(ws) - 1}")
    return " ".join(ws[:words]), " ".join(ws[words:])


def n_boundaries(text: str) -> int:
    """Word boundaries inside `text` where a pause may go."""
    return len(text.split()) - 1


def hesitant_speech(text: str, voice, words: int, pause_samples: int, synth,
                    sample_rate: int) -> tuple[np.ndarray, int, int]:
    """(speech (T,) float32, pause start, pause end) in samples from the speech's start:
    the two parts of `text` synthesised apart, `pause_samples` zeros between them."""
    if pause_samples < 1:
        raise ValueError(f"pause_samples must be >= 1, got {pause_samples}")
    head, tail = split_words(text, words)
    a = np.asarray(synth(head, voice, sample_rate), np.float32)
    b = np.asarray(synth(tail, voice, sample_rate), np.float32)
    out = np.concatenate([a, np.zeros(pause_samples, np.float32), b])
    return out, len(a), len(a) + pause_samples


def pause_span(turn, sample_rate: int) -> tuple[int, int] | None:
    """The pause of a turn as sample indices from its question start; None without one."""
    h = getattr(turn, "hesitation", None)
    if h is None:
        return None
    return (int(round((h.t0 - turn.t_q0) * sample_rate)),
            int(round((h.t1 - turn.t_q0) * sample_rate)))


def speech_only(q: np.ndarray, span: tuple[int, int] | None) -> np.ndarray:
    """The question audio without its pause (all of it when span is None)."""
    return q if span is None else np.concatenate([q[:span[0]], q[span[1]:]])
