"""Streaming resampling: a stream resampled chunk by chunk, as if resampled whole."""
from __future__ import annotations

import math

import numpy as np

from speech.audio import resample


class StreamResampler:
    """Resamples a stream chunk by chunk with the same result as resampling it whole
    (torchaudio's sinc), delayed by `pad` input samples of look-ahead; `flush` ends it."""

    def __init__(self, sr_in: int, sr_out: int, pad: int = 64):
        g = math.gcd(int(sr_in), int(sr_out))
        self.sr_in, self.sr_out, self.a, self.b = int(sr_in), int(sr_out), sr_in // g, sr_out // g
        self.pad = -(-pad // self.a) * self.a          # whole blocks of `a` input samples
        self._buf = np.zeros(self.pad, np.float32)     # left context: zeros, as offline

    def feed(self, x: np.ndarray) -> np.ndarray:
        if self.sr_in == self.sr_out:
            return np.asarray(x, np.float32)
        self._buf = np.concatenate([self._buf, np.asarray(x, np.float32)])
        ready = (len(self._buf) - 2 * self.pad) // self.a * self.a   # samples with full context
        if ready <= 0:
            return np.zeros(0, np.float32)
        y = resample(self._buf[:ready + 2 * self.pad], self.sr_in, self.sr_out)
        k = self.pad // self.a * self.b
        out = y[k:k + ready // self.a * self.b]
        self._buf = self._buf[ready:]
        return out

    def flush(self) -> np.ndarray:
        tail = len(self._buf) - self.pad
        out = self.feed(np.zeros(2 * self.pad + self.a, np.float32))
        return out[:int(round(tail * self.sr_out / self.sr_in))]
