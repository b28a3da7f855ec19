"""Streaming voice activity detection with silero-vad (JIT model shipped in the package).

Audio is processed in exact 512-sample windows (32 ms at 16 kHz); remainders are buffered,
so feeding any chunking of the same stream gives the same events (chunked == offline).
Silero's recurrent state (LSTM state + 64-sample context) lives inside its model object;
each StreamingVAD owns one model instance and `reset` clears it with `reset_states()`.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from speech.audio import check_pcm
from speech.constants import END_OF_TURN_SILENCE, SAMPLE_RATE, VAD_WINDOW


@dataclass(frozen=True)
class VADOptions:
    """threshold: a window is speech when prob >= threshold. neg_threshold: once speaking, a
    window is silence only when prob < neg_threshold (hysteresis; None = threshold - 0.15,
    silero's default). min_speech_ms: speech must last this long before "start" fires
    (start hangover). min_silence_ms: silence that ends a turn (stop hangover).
    speech_pad_ms: moves start earlier and end later by this much (clamped to the stream)."""
    threshold: float = 0.5
    min_speech_ms: float = 96.0
    min_silence_ms: float = END_OF_TURN_SILENCE * 1000
    speech_pad_ms: float = 0.0
    neg_threshold: float | None = None

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        neg = self.negative_threshold
        if not 0.0 < neg <= self.threshold:
            raise ValueError(f"neg_threshold must be in (0, threshold={self.threshold}], "
                             f"got {neg}")
        for name in ("min_speech_ms", "min_silence_ms", "speech_pad_ms"):
            v = getattr(self, name)
            if not (v >= 0 and np.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0 ms, got {v}")

    @property
    def negative_threshold(self) -> float:
        if self.neg_threshold is None:
            return max(self.threshold - 0.15, 0.01)
        return self.neg_threshold


@dataclass(frozen=True)
class VADEvent:
    kind: Literal["start", "end"]
    t: float      # seconds from stream start: start of the first speech window / end of the last
    prob: float   # speech probability of the window that decided the event


_POOL: list = []            # loaded silero models no stream is using (each holds its state)
_POOL_LOCK = threading.Lock()
POOL_MAX = 32               # models kept for reuse; more concurrent streams load their own


def _take_model():
    """A silero model for one stream: a pooled one (its state reset) or a fresh load. Loading
    costs a TorchScript load (~0.3-0.5 s of CPU on the shared cores) and memory that is never
    fully returned, so a server opening and closing sessions reuses them."""
    with _POOL_LOCK:
        model = _POOL.pop() if _POOL else None
    if model is None:
        return _load_silero()
    model.reset_states()
    return model


def _give_back(model) -> None:
    with _POOL_LOCK:
        if len(_POOL) < POOL_MAX:
            _POOL.append(model)


def _load_silero():
    threads = torch.get_num_threads()  # importing silero_vad sets torch threads to 1
    try:
        from silero_vad import load_silero_vad
    except ImportError as e:
        raise ImportError("silero-vad is not installed: pip install silero-vad") from e
    finally:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():  # silero's importlib/jit.load deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad(onnx=False)  # TorchScript: needs no onnxruntime


@contextmanager
def _one_thread():
    """Silero's tiny per-window ops run ~10x slower with intra-op threads on a busy CPU.
    The package sets torch threads to 1 process-wide on import; `_load_silero` undoes that
    and this narrows it to VAD calls on the calling thread."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class StreamingVAD:
    """Feed 16 kHz mono float32 audio in chunks of any length; get start/end events."""

    def __init__(self, options: VADOptions = VADOptions()):
        self.options = options
        self._model, self._closed = _take_model(), False
        self._release = weakref.finalize(self, _give_back, self._model)  # or at close()
        o = options
        self._min_speech = int(np.ceil(o.min_speech_ms * SAMPLE_RATE / 1000 / VAD_WINDOW))
        self._min_speech = max(self._min_speech, 1)                    # windows
        self._min_silence = int(round(o.min_silence_ms * SAMPLE_RATE / 1000))  # samples
        self._pad = int(round(o.speech_pad_ms * SAMPLE_RATE / 1000))           # samples
        self._buf = np.zeros(VAD_WINDOW, np.float32)  # remainder of the last feed
        self.reset()

    def close(self) -> None:
        """End the stream: its model goes back to the pool for the next stream at once
        (without close, when this object is collected). Audio fed afterwards is ignored."""
        self._closed = True
        self._release()

    def reset(self) -> None:
        """Forget everything: a new stream starts at t = 0."""
        self._model.reset_states()
        self._fill = 0
        self._n_windows = 0                 # windows processed so far
        self._speaking = False
        self._run_start = None              # first window of a not-yet-confirmed speech run
        self._run_len = 0
        self._speech_end = 0                # sample where the last speech window ended
        self._silence_start = None          # sample where the current silence began
        self.prob = 0.0
        self.probs: tuple[float, ...] = ()

    @property
    def is_speech(self) -> bool:
        """True between a "start" and its "end"."""
        return self._speaking

    @property
    def t(self) -> float:
        """Seconds of audio consumed into whole windows."""
        return self._n_windows * VAD_WINDOW / SAMPLE_RATE

    def feed(self, pcm) -> list[VADEvent]:
        """Process `(T,)` float32 16 kHz audio; returns the events it completed. `probs` holds
        the probability of each window processed by this call, `prob` the last one."""
        x = np.asarray(check_pcm(pcm, SAMPLE_RATE, SAMPLE_RATE, "VAD input")
                       if np.size(pcm) else np.zeros(0, np.float32), dtype=np.float32)
        events, probs = [], []
        if self._closed:                         # a capture thread racing a stop
            return events
        with _one_thread():
            self._consume(x, events, probs)
        if probs:
            self.probs, self.prob = tuple(probs), probs[-1]
        else:
            self.probs = ()
        return events

    def _consume(self, x: np.ndarray, events: list, probs: list) -> None:
        i = 0
        while i < x.shape[0]:
            k = min(VAD_WINDOW - self._fill, x.shape[0] - i)
            self._buf[self._fill:self._fill + k] = x[i:i + k]
            self._fill, i = self._fill + k, i + k
            if self._fill == VAD_WINDOW:
                self._fill = 0
                p = self._window_prob(self._buf)
                probs.append(p)
                ev = self._step(p)
                if ev is not None:
                    events.append(ev)

    def finish(self) -> list[VADEvent]:
        """End of stream: closes an open speech segment at the end of its last speech window.
        The buffered remainder (< 512 samples) is not scored."""
        if not self._speaking:
            return []
        self._speaking = False
        end = min(self._speech_end + self._pad, self._n_windows * VAD_WINDOW)
        return [VADEvent("end", end / SAMPLE_RATE, self.prob)]

    @torch.inference_mode()
    def _window_prob(self, window: np.ndarray) -> float:
        return float(self._model(torch.from_numpy(window), SAMPLE_RATE).item())

    def _step(self, p: float) -> VADEvent | None:
        o, w = self.options, self._n_windows
        self._n_windows += 1
        start, end = w * VAD_WINDOW, (w + 1) * VAD_WINDOW  # samples covered by this window
        if not self._speaking:
            if p < o.threshold:
                self._run_start, self._run_len = None, 0
                return None
            if self._run_start is None:
                self._run_start = start
            self._run_len += 1
            self._speech_end = end
            if self._run_len < self._min_speech:
                return None
            t0 = max(self._run_start - self._pad, 0)
            self._speaking, self._silence_start = True, None
            self._run_start, self._run_len = None, 0
            return VADEvent("start", t0 / SAMPLE_RATE, p)
        if p >= o.threshold:
            self._silence_start = None
        if p >= o.negative_threshold:
            if self._silence_start is None:
                self._speech_end = end
            return None
        if self._silence_start is None:
            self._silence_start = start
        if end - self._silence_start < self._min_silence:
            return None
        self._speaking = False
        t1 = min(self._speech_end + self._pad, end)
        return VADEvent("end", t1 / SAMPLE_RATE, p)
