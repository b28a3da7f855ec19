"""Room reverberation of the question speech ("mix" question voices, demo/voices.py).

A `Room` is a seeded synthetic impulse response: the direct sound, then after a short
pre-delay an exponentially decaying noise tail that falls 60 dB in `rt60_s`, scaled so the
direct sound is `drr_db` above the tail's energy, its highs fading faster (a one-pole
low-pass sweeping down over the tail). Only the user's speech is reverberated: beeps stay
as the page defines them. The output keeps the input's length (the tail past the last
word is cut with a 20 ms fade), so a question still ends where its spec says.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ROOM_PROB = 0.5                    # "mix": share of train/val sessions spoken in a room
RT60_S = (0.15, 0.5)               # reverberation time, s (small office .. living room)
DRR_DB = (6.0, 15.0)               # direct-to-reverberant energy ratio, dB (a user near the mic)
PREDELAY_S = (0.002, 0.012)        # direct sound -> first reflections
TAIL_FADE_S = 0.02


@dataclass(frozen=True)
class Room:
    rt60_s: float
    drr_db: float
    predelay_s: float
    seed: int                      # seeds the tail's noise

    def __post_init__(self):
        if not 0.05 <= self.rt60_s <= 2.0 or not -10.0 <= self.drr_db <= 30.0 \
                or not 0.0 <= self.predelay_s <= 0.05:
            raise ValueError(f"a Room needs rt60_s in [0.05, 2], drr_db in [-10, 30] and "
                             f"predelay_s in [0, 0.05], got {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Room | None":
        return None if d is None else cls(float(d["rt60_s"]), float(d["drr_db"]),
                                           float(d["predelay_s"]), int(d["seed"]))


def sample_room(rng) -> Room:
    """A room drawn inside RT60_S, DRR_DB and PREDELAY_S."""
    return Room(round(float(rng.uniform(*RT60_S)), 3), round(float(rng.uniform(*DRR_DB)), 2),
                round(float(rng.uniform(*PREDELAY_S)), 4), int(rng.integers(2**31)))


def impulse_response(room: Room, sample_rate: int) -> np.ndarray:
    """The room's impulse response, float64 (T,), direct sound 1.0 at index 0."""
    n = int(round(room.rt60_s * sample_rate))
    rng = np.random.default_rng(room.seed)
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / room.rt60_s)    # -60 dB at rt60
    a = np.clip(np.exp(-2 * np.pi * np.linspace(6000.0, 1500.0, n) / sample_rate), 0, 0.999)
    y, out = 0.0, np.empty(n)
    for i in range(n):                                 # low-pass, darker as the tail decays
        y = (1 - a[i]) * tail[i] + a[i] * y
        out[i] = y
    out *= 10 ** (-room.drr_db / 20) / max(float(np.sqrt(np.sum(out * out))), 1e-12)
    pre = int(round(room.predelay_s * sample_rate))
    h = np.zeros(pre + 1 + n)
    h[0] = 1.0
    h[pre + 1:] = out
    return h


def reverberate(x: np.ndarray, room: Room | None, sample_rate: int) -> np.ndarray:
    """`x` heard in `room` (None: `x` as it is), same length, float64."""
    x = np.asarray(x, np.float64)
    if room is None or len(x) == 0:
        return x
    h = impulse_response(room, sample_rate)
    m = 1 << (len(x) + len(h) - 2).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, m) * np.fft.rfft(h, m), m)[:len(x)]
    nf = min(len(y), int(round(TAIL_FADE_S * sample_rate)))
    y[len(y) - nf:] *= np.linspace(1.0, 0.0, nf)
    return y
