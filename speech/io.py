"""Audio sources and sinks: files, memory and the local sound card (PortAudio duplex).

A source yields mono float32 chunks (`read` -> chunk, an empty chunk on timeout, None at
the end). A sink takes mono float32 PCM, can say how much is still queued and can drop it
(`clear`, used for barge-in).
"""
from __future__ import annotations

import abc
import collections
import math
import threading
import time

import numpy as np

from speech.audio import WavAppender, load_audio
from speech.constants import SAMPLE_RATE

_EMPTY = np.zeros(0, dtype=np.float32)
_FLAGS = "choose with --input-device/--output-device NAME_OR_INDEX"


class AudioDeviceError(RuntimeError):
    """The sound card cannot be used (PortAudio missing, no such device, stream error)."""


def _mono_float(pcm) -> np.ndarray:
    x = np.asarray(pcm, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"sinks take mono (T,) float32 PCM, got shape {x.shape}; "
                         "average the channels with speech.audio.to_mono")
    return x


class AudioSource(abc.ABC):
    """Mono float32 audio arriving in chunks at `sample_rate`."""
    sample_rate: int

    @abc.abstractmethod
    def read(self, timeout: float | None = None) -> np.ndarray | None:
        """Next chunk `(n,)`; an empty chunk when `timeout` s pass without audio; None at end."""

    def close(self) -> None:
        pass

    def __iter__(self):
        while (chunk := self.read()) is not None:
            if chunk.size:
                yield chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AudioSink(abc.ABC):
    """Plays mono float32 PCM at `sample_rate`."""
    sample_rate: int

    @abc.abstractmethod
    def write(self, pcm) -> None:
        """Queue `(T,)` float32 PCM for playback."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Drop everything queued but not yet played (barge-in)."""

    @abc.abstractmethod
    def queued_seconds(self) -> float:
        """Seconds of audio written but not yet played."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileSource(AudioSource):
    """An audio file as a source: loaded, mono, resampled to `sample_rate`, cut into
    `chunk_seconds` chunks (the last may be shorter). With `realtime`, each chunk is
    released when it would have finished arriving from a microphone."""

    def __init__(self, path, sample_rate: int = SAMPLE_RATE, chunk_seconds: float = 0.02,
                 realtime: bool = False):
        if not chunk_seconds > 0:
            raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds!r}")
        self.sample_rate = int(sample_rate)
        self.audio = load_audio(path, self.sample_rate)  # (T,)
        self.chunk = max(1, int(round(chunk_seconds * self.sample_rate)))
        self.realtime, self._pos, self._t0, self._closed = realtime, 0, None, False

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        if self._closed or self._pos >= self.audio.shape[0]:
            return None
        end = min(self._pos + self.chunk, self.audio.shape[0])
        if self.realtime:
            now = time.monotonic()
            if self._t0 is None:
                self._t0 = now
            wait = self._t0 + end / self.sample_rate - now
            if timeout is not None and wait > timeout:
                time.sleep(max(timeout, 0.0))
                return _EMPTY
            if wait > 0:
                time.sleep(wait)
        chunk, self._pos = self.audio[self._pos:end], end
        return chunk

    def close(self) -> None:
        self._closed = True


class MemorySink(AudioSink):
    """Keeps what it is given in memory (`.audio`). With `clock=None` audio counts as played
    the moment it is written; with a clock (e.g. time.monotonic) it plays at real time from
    when written, so `queued_seconds` and `clear` behave like a speaker's."""

    def __init__(self, sample_rate: int, clock=None):
        self.sample_rate, self.clock = int(sample_rate), clock
        self._chunks: list[np.ndarray] = []
        self._play_end = 0.0  # clock time at which everything kept has played
        self.cleared_samples = 0

    @property
    def audio(self) -> np.ndarray:
        """Everything played or still queued, `(T,)`."""
        return np.concatenate(self._chunks) if self._chunks else _EMPTY

    def write(self, pcm) -> None:
        x = _mono_float(pcm).copy()
        self._chunks.append(x)
        if self.clock is not None:
            self._play_end = max(self.clock(), self._play_end) + x.shape[0] / self.sample_rate

    def queued_seconds(self) -> float:
        return 0.0 if self.clock is None else max(0.0, self._play_end - self.clock())

    def clear(self) -> None:
        drop = int(round(self.queued_seconds() * self.sample_rate))
        self.cleared_samples += drop
        while drop > 0 and self._chunks:
            last = self._chunks.pop()
            if last.shape[0] > drop:
                self._chunks.append(last[:last.shape[0] - drop])
            drop -= last.shape[0]
        if self.clock is not None:
            self._play_end = self.clock()


class WavSink(AudioSink):
    """Writes PCM16 mono to a crash-safe WAV file (`WavAppender`); plays instantly, so
    nothing is ever queued and `clear` has nothing to drop."""

    def __init__(self, path, sample_rate: int, flush_seconds: float = 1.0):
        self.sample_rate = int(sample_rate)
        self._wav = WavAppender(path, self.sample_rate, flush_seconds)

    def write(self, pcm) -> None:
        self._wav.write(_mono_float(pcm))

    def queued_seconds(self) -> float:
        return 0.0

    def clear(self) -> None:
        pass

    def close(self) -> None:
        self._wav.close()


# --- sound card --------------------------------------------------------------------------------
def _sd():
    try:
        import sounddevice as sd
    except OSError as e:
        raise AudioDeviceError(f"PortAudio not found: apt-get install libportaudio2 ({e})") from e
    except ImportError as e:
        raise AudioDeviceError("sounddevice is not installed: pip install sounddevice") from e
    return sd


def list_devices(refresh: bool = False) -> list[dict]:
    """The sound devices PortAudio sees: index, name, hostapi, inputs, outputs,
    default_samplerate. `refresh` re-scans (devices plugged in or servers started since)."""
    sd = _sd()
    if refresh:
        sd._terminate()
        sd._initialize()
    return [dict(index=i, name=d["name"], hostapi=sd.query_hostapis(d["hostapi"])["name"],
                 inputs=d["max_input_channels"], outputs=d["max_output_channels"],
                 default_samplerate=d["default_samplerate"])
            for i, d in enumerate(sd.query_devices())]


def _devices_text() -> str:
    devs = list_devices()
    if not devs:
        return "  (none: PortAudio sees no sound devices; is a sound server running?)"
    return "\n".join(f"  {d['index']}: {d['name']} ({d['hostapi']}, {d['inputs']} in, "
                     f"{d['outputs']} out)" for d in devs)


def _resolve(sd, device, kind: str) -> int:
    try:
        info = sd.query_devices(device, kind=kind)
        if info[f"max_{kind}_channels"] < 1:
            raise ValueError(f"device {info['name']!r} has no {kind} channels")
    except (ValueError, sd.PortAudioError) as e:
        what = f"no default {kind} device" if device is None else f"no {kind} device {device!r}"
        raise AudioDeviceError(f"{what} ({e}). Available devices:\n{_devices_text()}\n"
                               f"{_FLAGS}") from e
    return int(info["index"])


class _DeviceSource(AudioSource):
    def __init__(self, dev: "DuplexDevice"):
        self._dev, self.sample_rate = dev, dev.input_rate

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        d = self._dev
        deadline = None if timeout is None else time.monotonic() + timeout
        with d._cond:
            while not d._in_q and not d._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                d._cond.wait(left)
            if d._closed:
                return None
            if d._in_q:
                return d._in_q.popleft()
        d._check_alive()
        return _EMPTY

    def close(self) -> None:
        self._dev.close()


class _DeviceSink(AudioSink):
    def __init__(self, dev: "DuplexDevice"):
        self._dev, self.sample_rate = dev, dev.output_rate

    def write(self, pcm) -> None:
        """Copies into the ring buffer, waiting for room while the speaker plays."""
        x, d = _mono_float(pcm), self._dev
        cap = d._ring.shape[0]
        while x.shape[0]:
            with d._cond:
                while d._w - d._r >= cap and not d._closed:
                    d._cond.wait(0.1)
                if d._closed:
                    raise AudioDeviceError("write to a closed DuplexDevice")
                n = min(x.shape[0], cap - (d._w - d._r))
                i = d._w % cap
                k = min(n, cap - i)
                d._ring[i:i + k] = x[:k]
                d._ring[:n - k] = x[k:n]
                d._w += n
            x = x[n:]

    def clear(self) -> None:
        with self._dev._cond:
            self._dev._r = self._dev._w
            self._dev._cond.notify_all()

    def queued_seconds(self) -> float:
        return (self._dev._w - self._dev._r) / self.sample_rate

    def close(self) -> None:
        self._dev.close()


class DuplexDevice:
    """Microphone + speaker through PortAudio. Mic blocks go to a bounded queue (the oldest
    is dropped when full, counted in `stats`); the speaker plays from a preallocated ring
    buffer (silence on underrun). `.source` and `.sink` are the two ends; closing either
    closes the device.

    By default the mic and the speaker are two PortAudio streams, which works with every
    host API. `duplex=True` uses one full-duplex stream (sample-synchronous in and out, for
    hardware devices; needs equal rates). PortAudio's ALSA duplex stream stops after a few
    blocks on PulseAudio's ALSA plugin, so it is opt-in; a stopped stream makes
    `source.read` raise AudioDeviceError instead of waiting forever."""

    def __init__(self, input_device=None, output_device=None, input_rate: int = SAMPLE_RATE,
                 output_rate: int = SAMPLE_RATE, block_seconds: float = 0.02,
                 input_queue_seconds: float = 2.0, output_buffer_seconds: float = 60.0,
                 latency="low", duplex: bool = False):
        if not (block_seconds > 0 and input_queue_seconds >= block_seconds
                and output_buffer_seconds > 0):
            raise ValueError("need block_seconds > 0, input_queue_seconds >= block_seconds, "
                             f"output_buffer_seconds > 0; got {block_seconds}, "
                             f"{input_queue_seconds}, {output_buffer_seconds}")
        if duplex and input_rate != output_rate:
            raise ValueError(f"duplex=True needs input_rate == output_rate, got {input_rate} "
                             f"and {output_rate}; use duplex=False (two streams)")
        sd = _sd()
        self.input_rate, self.output_rate = int(input_rate), int(output_rate)
        self.input_device = _resolve(sd, input_device, "input")
        self.output_device = _resolve(sd, output_device, "output")
        self._cond = threading.Condition()
        self._in_q = collections.deque(maxlen=math.ceil(input_queue_seconds / block_seconds))
        self._ring = np.zeros(int(output_buffer_seconds * self.output_rate), np.float32)
        self._r = self._w = 0  # read / write counters; positions are modulo the capacity
        self._closed, self._started = False, False
        self.stats = dict(dropped_input_blocks=0, input_overflows=0, output_underruns=0)
        in_block = max(1, int(round(block_seconds * self.input_rate)))
        out_block = max(1, int(round(block_seconds * self.output_rate)))
        common = dict(dtype="float32", latency=latency)
        try:
            if duplex:
                self._streams = [sd.Stream(
                    samplerate=self.input_rate, blocksize=in_block, channels=(1, 1),
                    device=(self.input_device, self.output_device), callback=self._duplex_cb,
                    **common)]
            else:
                self._streams = [
                    sd.InputStream(samplerate=self.input_rate, blocksize=in_block, channels=1,
                                   device=self.input_device, callback=self._in_cb, **common),
                    sd.OutputStream(samplerate=self.output_rate, blocksize=out_block,
                                    channels=1, device=self.output_device,
                                    callback=self._out_cb, **common)]
        except sd.PortAudioError as e:
            raise AudioDeviceError(f"cannot open the sound device ({e}); available devices:\n"
                                   f"{_devices_text()}\n{_FLAGS}") from e
        self.source: AudioSource = _DeviceSource(self)
        self.sink: AudioSink = _DeviceSink(self)

    # PortAudio callbacks (audio thread: no allocation beyond the mic block copy)
    def _in_cb(self, indata, frames, time_info, status) -> None:
        block = indata[:, 0].copy()
        with self._cond:
            if status.input_overflow:
                self.stats["input_overflows"] += 1
            if len(self._in_q) == self._in_q.maxlen:
                self.stats["dropped_input_blocks"] += 1
            self._in_q.append(block)
            self._cond.notify_all()

    def _out_cb(self, outdata, frames, time_info, status) -> None:
        cap = self._ring.shape[0]
        with self._cond:
            n = min(frames, self._w - self._r)
            i = self._r % cap
            k = min(n, cap - i)
            outdata[:k, 0] = self._ring[i:i + k]
            outdata[k:n, 0] = self._ring[:n - k]
            outdata[n:] = 0.0
            self._r += n
            if 0 < n < frames:
                self.stats["output_underruns"] += 1
            self._cond.notify_all()

    def _duplex_cb(self, indata, outdata, frames, time_info, status) -> None:
        self._in_cb(indata, frames, time_info, status)
        self._out_cb(outdata, frames, time_info, status)

    def _check_alive(self) -> None:
        if self._started and not self._closed and not all(s.active for s in self._streams):
            raise AudioDeviceError("the sound device stream stopped (PortAudio error or device "
                                   "unplugged); close this DuplexDevice and open a new one")

    def start(self) -> "DuplexDevice":
        if self._closed:
            raise AudioDeviceError("DuplexDevice is closed; open a new one")
        if not self._started:
            for s in self._streams:
                s.start()
            self._started = True
        return self

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        for s in self._streams:
            s.stop()
            s.close()

    def __enter__(self) -> "DuplexDevice":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
