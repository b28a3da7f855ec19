"""Streaming resampling: a stream resampled chunk by chunk, exactly as if resampled whole.

One resampler for every stream (microphones, the browser's input audio, the agent's voice
to a sound card): libsoxr's streaming converter (python-soxr). It handles any ratio in C
with a fixed, small state (a few tens of KB), so building one for a rate that shares no
factor with 16 kHz (e.g. 8003 Hz) costs no more than for 48 kHz; the windowed-sinc kernels
of torchaudio are sized by the rates' greatest common divisor instead (gigabytes then).
"""
from __future__ import annotations

import numpy as np

QUALITY = "HQ"             # libsoxr's high quality: 20-bit precision, far below one PCM16 step
MAX_RATE = 384_000         # Hz: above any real audio device; keeps the converter's buffers small


def _check_rate(name: str, sr) -> int:
    if isinstance(sr, bool) or int(sr) != sr or not 1 <= sr <= MAX_RATE:
        raise ValueError(f"{name} must be an integer sample rate in [1, {MAX_RATE}] Hz, got {sr!r}")
    return int(sr)


def resample_whole(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """`(T,)` float audio resampled at once: what `StreamResampler` gives chunk by chunk."""
    import soxr
    sr_in, sr_out = _check_rate("sr_in", sr_in), _check_rate("sr_out", sr_out)
    x = np.ascontiguousarray(x, np.float32)
    return x if sr_in == sr_out else soxr.resample(x, sr_in, sr_out, quality=QUALITY)


class StreamResampler:
    """Resamples a `(T,)` float32 stream chunk by chunk: the concatenated output of `feed`
    calls and `flush` equals `resample_whole` of the whole stream. Output lags the input by
    part of the converter's block (measured to 16 kHz: about 20 ms on average, 37 ms at
    most from 48 kHz; 65 ms on average, 115 ms at most from 8 kHz); `flush` ends the stream."""

    def __init__(self, sr_in: int, sr_out: int):
        self.sr_in, self.sr_out = _check_rate("sr_in", sr_in), _check_rate("sr_out", sr_out)
        self._rs = None
        if self.sr_in != self.sr_out:
            import soxr
            self._rs = soxr.ResampleStream(self.sr_in, self.sr_out, 1, dtype="float32",
                                           quality=QUALITY)

    def feed(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32).reshape(-1)
        return x if self._rs is None else self._rs.resample_chunk(x)

    def flush(self) -> np.ndarray:
        """The rest of the stream; the resampler then starts a new one."""
        if self._rs is None:
            return np.zeros(0, np.float32)
        out = self._rs.resample_chunk(np.zeros(0, np.float32), last=True)
        self._rs.clear()
        return out
