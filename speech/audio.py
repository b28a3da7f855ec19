"""Audio arrays and WAV files: conversion, validation, tolerant reading, crash-safe writing.

Layout: mono audio is `(T,)`, multi-channel is `(T, C)` (soundfile's layout), float32 in
[-1, 1]. PCM16 conversion uses `PCM16_MAX` full scale in both directions.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from speech.constants import PCM16_MAX, SAMPLE_RATE


def _is_tensor(x) -> bool:  # without importing torch (keeps file/device tools light)
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


class AudioFileError(ValueError):
    """An audio file that exists but cannot be read (corrupt, not audio, empty)."""


# --- arrays ----------------------------------------------------------------------------------
MAX_SINC_PHASES = 1000   # torchaudio's kernel has sr_out / gcd rows: past this, libsoxr


def resample(x, sr_in: int, sr_out: int):
    """Resample `(T,)` or `(T, C)` audio from `sr_in` to `sr_out` Hz (torchaudio's
    band-limited sinc). Returns the input's type (numpy float32 or Tensor).
    Rates that share only a small factor (e.g. 8003 -> 16000 Hz: a kernel of gigabytes)
    go through libsoxr (speech.resample) instead, at the same small cost as any other."""
    import math

    import torch
    import torchaudio.functional as AF

    for name, sr in (("sr_in", sr_in), ("sr_out", sr_out)):
        if int(sr) != sr or sr <= 0:
            raise ValueError(f"{name} must be a positive integer sample rate in Hz, got {sr!r}")
    is_np = not _is_tensor(x)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if is_np else x
    if t.ndim not in (1, 2):
        raise ValueError(f"resample takes (T,) or (T, C) audio, got shape {tuple(t.shape)}")
    g = math.gcd(int(sr_in), int(sr_out))
    if max(int(sr_in), int(sr_out)) // g > MAX_SINC_PHASES:
        from speech.resample import resample_whole
        a = t.detach().cpu().numpy()                       # (T,) or (T, C)
        cols = [resample_whole(c, int(sr_in), int(sr_out)) for c in (a[:, None] if a.ndim == 1 else a).T]
        y = cols[0] if a.ndim == 1 else np.stack(cols, 1)
        t = torch.from_numpy(np.ascontiguousarray(y)).to(t.device)
    elif int(sr_in) != int(sr_out):
        y = AF.resample(t.T if t.ndim == 2 else t, int(sr_in), int(sr_out))
        t = y.T.contiguous() if t.ndim == 2 else y
    return t.numpy().astype(np.float32, copy=False) if is_np else t


def to_mono(x):
    """Average the channels of `(T, C)` audio into `(T,)`; `(T,)` is returned as is."""
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"to_mono takes (T,) or (T, C) audio, got shape {tuple(x.shape)}")
    if _is_tensor(x):
        return x.mean(dim=1)
    return x.mean(axis=1, dtype=np.float64).astype(np.float32)


def float_to_pcm16(x) -> np.ndarray:
    """Float audio in [-1, 1] -> int16. Out-of-range values are clipped (never wrapped);
    NaN and +-inf become 0."""
    a = x.detach().cpu().numpy() if _is_tensor(x) else np.asarray(x)
    a = np.nan_to_num(a.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    return np.rint(np.clip(a, -1.0, 1.0) * PCM16_MAX).astype(np.int16)


def pcm16_to_float(b) -> np.ndarray:
    """Little-endian PCM16 bytes (or an int16 array) -> float32 in [-1, 1]."""
    if isinstance(b, (bytes, bytearray, memoryview)):
        if len(b) % 2:
            raise ValueError(f"PCM16 needs an even number of bytes, got {len(b)}: "
                             "a sample was split; keep the odd byte for the next message")
        a = np.frombuffer(b, dtype="<i2")
    else:
        a = np.asarray(b)
        if a.dtype != np.int16:
            raise ValueError(f"pcm16_to_float takes bytes or an int16 array, got {a.dtype}")
    return (a.astype(np.float32) / PCM16_MAX).astype(np.float32)


def check_pcm(x, sample_rate: int, expected_rate: int = SAMPLE_RATE, name: str = "audio"):
    """Validate audio handed to a model: mono float `(T,)`, at `expected_rate`, non-empty,
    finite. Returns `x` unchanged; raises ValueError saying what to do otherwise."""
    shape = tuple(x.shape) if hasattr(x, "shape") else None
    if shape is None:
        raise ValueError(f"{name}: expected a numpy array or Tensor, got {type(x).__name__}")
    if len(shape) != 1:
        raise ValueError(f"{name}: expected mono audio of shape (T,), got shape {shape}; "
                         "pass mono audio: average the channels with speech.audio.to_mono")
    if int(sample_rate) != int(expected_rate):
        raise ValueError(f"{name}: sample rate is {sample_rate} Hz, expected {expected_rate} Hz; "
                         f"resample with speech.audio.resample(x, {sample_rate}, {expected_rate})")
    dtype = str(x.dtype)
    if "float" not in dtype:
        raise ValueError(f"{name}: expected float audio in [-1, 1], got dtype {dtype}; "
                         "convert PCM16 with speech.audio.pcm16_to_float")
    if shape[0] == 0:
        raise ValueError(f"{name}: audio is empty (0 samples); pass at least one sample")
    finite = x.isfinite().all().item() if _is_tensor(x) else np.isfinite(x).all()
    if not finite:
        raise ValueError(f"{name}: audio contains NaN or inf; clean it first, e.g. "
                         "np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)")
    return x


# --- WAV reading -----------------------------------------------------------------------------
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
_UNKNOWN = 0xFFFFFFFF


def _looks_like_chunk(head: bytes, remaining: int) -> bool:
    """True when `head` (8 bytes) is a plausible RIFF chunk header fitting in `remaining`."""
    if head[:3] == b"ID3":  # an ID3 tag appended after the RIFF data
        return True
    if len(head) < 8:
        return False
    cid, size = head[:4], struct.unpack("<I", head[4:8])[0]
    return all(0x20 <= c <= 0x7E for c in cid) and size + 8 <= remaining


def _parse_wav(path: Path):
    """Parse a RIFF/WAVE file's chunks. Returns (fmt dict, data offset, data bytes, trusted)
    where data bytes is recovered from the file size when the header was never finalised."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            what = "file is empty" if size == 0 else f"starts with {head[:12]!r}"
            raise AudioFileError(f"{path}: not a WAV file ({what}; expected 'RIFF....WAVE')")
        riff_size = struct.unpack("<I", head[4:8])[0]
        riff_ok = riff_size not in (0, _UNKNOWN) and 0 <= size - 8 - riff_size <= 1
        fmt, pos = None, 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, csize = struct.unpack("<4sI", f.read(8))
            body = pos + 8
            if cid == b"fmt ":
                raw = f.read(min(csize, 40))
                if len(raw) < 16:
                    raise AudioFileError(
                        f"{path}: WAV 'fmt ' chunk is truncated ({len(raw)} bytes)")
                tag, ch, sr, _, align, bits = struct.unpack("<HHIIHH", raw[:16])
                if tag == _EXTENSIBLE and len(raw) >= 26:
                    tag = struct.unpack("<H", raw[24:26])[0]
                fmt = dict(tag=tag, channels=ch, rate=sr, align=align, bits=bits)
            elif cid == b"data":
                if fmt is None:
                    raise AudioFileError(f"{path}: WAV 'data' chunk comes before any 'fmt ' chunk")
                end = body + csize
                trusted = csize != _UNKNOWN and end <= size and (csize > 0 or riff_ok)
                if trusted and not riff_ok and end < size:
                    # header updated at the last flush, samples appended after it (crash)
                    after = end + (csize & 1)
                    f.seek(after)
                    trusted = _looks_like_chunk(f.read(8), size - after)
                return fmt, body, (csize if trusted else size - body), trusted
            pos = body + csize + (csize & 1)
    what = "no 'fmt ' chunk" if fmt is None else "no 'data' chunk"
    raise AudioFileError(f"{path}: WAV file is corrupt or truncated ({what})")


def wav_rate(path) -> int:
    """The sample rate a WAV header states, read without reading the samples."""
    return int(_parse_wav(Path(path))[0]["rate"])


def wav_cut_short(path) -> tuple[float, float] | None:
    """(seconds the header says, seconds the file holds) for a WAV whose finalised header
    promises more samples than the file has (a copy cut short); None otherwise. A header
    never finalised (sizes 0 or 0xFFFFFFFF: a crash while recording) is not "cut short"."""
    path = Path(path)
    fmt, offset, nbytes, trusted = _parse_wav(path)
    with open(path, "rb") as f:
        f.seek(offset - 4)
        claimed = struct.unpack("<I", f.read(4))[0]
    frame = max(1, fmt["channels"] * fmt["bits"] // 8)
    if trusted or claimed in (0, _UNKNOWN) or claimed <= nbytes or fmt["rate"] < 1:
        return None
    return claimed / frame / fmt["rate"], nbytes / frame / fmt["rate"]


def read_wav(path) -> tuple[np.ndarray, int]:
    """Read a WAV file -> (float32 `(T,)` or `(T, C)`, sample_rate). Tolerates a header that
    was never finalised (sizes 0, 0xFFFFFFFF or past the end of the file, or samples
    appended after the last header update): reads to the end of the file, dropping a
    trailing partial sample. Raises AudioFileError for anything that is not a WAV."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such WAV file")
    fmt, offset, nbytes, trusted = _parse_wav(path)
    ch, rate, bits, tag = fmt["channels"], fmt["rate"], fmt["bits"], fmt["tag"]
    if ch < 1 or rate < 1:
        raise AudioFileError(f"{path}: WAV header has {ch} channels at {rate} Hz")
    if trusted:
        try:  # PCM16 via int16 so that both paths use pcm16_to_float's scale
            pcm16 = sf.info(str(path)).subtype == "PCM_16"
            x, sr = sf.read(str(path), dtype="int16" if pcm16 else "float32", always_2d=False)
            x = pcm16_to_float(x) if pcm16 else np.ascontiguousarray(x, dtype=np.float32)
            return x, int(sr)
        except Exception as e:  # libsndfile rejects it: fall back to our own parser
            if not ((tag, bits) in ((_PCM, 16), (_FLOAT, 32))):
                raise AudioFileError(f"{path}: unreadable WAV ({e})") from e
    is_pcm16 = (tag, bits) == (_PCM, 16)
    if is_pcm16 or (tag, bits) == (_FLOAT, 32):
        dtype = np.dtype("<i2" if is_pcm16 else "<f4")
    else:
        raise AudioFileError(f"{path}: unfinalised WAV in format tag {tag} / {bits} bit; only "
                             "PCM16 and float32 can be recovered (re-encode with sox or ffmpeg)")
    frame = ch * dtype.itemsize
    n = max(nbytes, 0) // frame
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(n * frame)
    x = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
    x = pcm16_to_float(x.astype(np.int16)) if is_pcm16 else x.astype(np.float32)
    return (x if ch == 1 else x.reshape(-1, ch)), int(rate)


def load_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Load an audio file as mono float32 `(T,)` at `sample_rate` (channels averaged).
    WAV goes through the tolerant `read_wav`; other formats through soundfile."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    with open(path, "rb") as f:
        is_wav = f.read(4) == b"RIFF"
    if is_wav:
        x, sr = read_wav(path)
    else:
        try:
            x, sr = sf.read(str(path), dtype="float32", always_2d=False)
        except Exception as e:
            raise AudioFileError(f"{path}: not a readable audio file ({e})") from e
    if x.shape[0] == 0:
        raise AudioFileError(f"{path}: contains no audio samples")
    return resample(to_mono(np.asarray(x, dtype=np.float32)), sr, sample_rate)


# --- WAV writing -----------------------------------------------------------------------------
class WavAppender:
    """Append-only, crash-safe PCM16 mono WAV writer.

    The header is written up front with placeholder sizes; `write` appends samples straight
    to the OS (unbuffered, so a killed process loses nothing it wrote); `flush` rewrites the
    RIFF and data sizes and fsyncs, automatically every `flush_seconds` of audio; `close`
    finalises. A file cut short at any point is recovered by `read_wav`."""

    def __init__(self, path, sample_rate: int, flush_seconds: float = 1.0):
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        if not flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0, got {flush_seconds!r}")
        self.path, self.sample_rate = Path(path), int(sample_rate)
        self.n_samples, self._flushed_at = 0, 0
        self._flush_every = max(1, int(round(flush_seconds * self.sample_rate)))
        self._f = open(self.path, "wb", buffering=0)
        self._write_all(self._header(_UNKNOWN, _UNKNOWN))
        os.fsync(self._f.fileno())

    def _header(self, riff: int, data: int) -> bytes:
        sr = self.sample_rate
        return (b"RIFF" + struct.pack("<I", riff) + b"WAVE"
                + b"fmt " + struct.pack("<IHHIIHH", 16, _PCM, 1, sr, sr * 2, 2, 16)
                + b"data" + struct.pack("<I", data))

    def _write_all(self, b: bytes) -> None:
        view = memoryview(b)
        while view:
            view = view[self._f.write(view):]

    @property
    def duration(self) -> float:
        return self.n_samples / self.sample_rate

    def write(self, x) -> None:
        """Append mono float samples `(T,)` (clipped to [-1, 1])."""
        if self._f is None:
            raise ValueError(f"{self.path}: WavAppender is closed")
        if np.ndim(x) != 1:
            raise ValueError(f"WavAppender writes mono (T,) audio, got shape {np.shape(x)}; "
                             "average the channels with speech.audio.to_mono")
        pcm = float_to_pcm16(x)
        self._write_all(pcm.astype("<i2", copy=False).tobytes())
        self.n_samples += pcm.shape[0]
        if self.n_samples - self._flushed_at >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        """Make everything written so far durable and readable by any WAV reader."""
        if self._f is None:
            return
        data = self.n_samples * 2
        os.fsync(self._f.fileno())  # samples first, then the sizes that cover them
        self._f.seek(4)
        self._write_all(struct.pack("<I", 36 + data))
        self._f.seek(40)
        self._write_all(struct.pack("<I", data))
        self._f.seek(0, os.SEEK_END)
        os.fsync(self._f.fileno())
        self._flushed_at = self.n_samples

    def close(self) -> None:
        if self._f is not None:
            self.flush()
            self._f.close()
            self._f = None

    def __enter__(self) -> "WavAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
