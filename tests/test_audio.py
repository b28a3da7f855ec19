"""speech.audio: conversions, validation, tolerant WAV reading, crash-safe WAV writing."""
import os
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speech.audio import (AudioFileError, WavAppender, check_pcm, float_to_pcm16, load_audio,
                          pcm16_to_float, read_wav, resample, to_mono)


def tone(freq, seconds, sr, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_freq(x, sr):
    return np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x))))) * sr / len(x)


def raw_wav(path, payload: bytes, riff=None, data=None, tag=1, ch=1, sr=16000, bits=16,
            extra: bytes = b""):
    """A WAV file with exactly the given header sizes (None = correct)."""
    align = ch * bits // 8
    fmt = struct.pack("<HHIIHH", tag, ch, sr, sr * align, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    body += b"data" + struct.pack("<I", len(payload) if data is None else data) + payload + extra
    riff = len(body) if riff is None else riff
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", riff) + body)
    return path


# --- arrays ----------------------------------------------------------------------------------
def test_resample_keeps_type_length_and_pitch():
    x = tone(440, 1.0, 44_100)
    y = resample(x, 44_100, 16_000)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (16_000,)
    assert abs(peak_freq(y, 16_000) - 440) < 2
    yt = resample(torch.from_numpy(x), 44_100, 16_000)
    assert torch.is_tensor(yt) and torch.allclose(yt, torch.from_numpy(y), atol=1e-6)
    st = resample(np.stack([x, -x], axis=1), 44_100, 16_000)
    assert st.shape == (16_000, 2) and np.allclose(st[:, 0], y, atol=1e-6)
    assert np.array_equal(resample(x, 8000, 8000), x)
    with pytest.raises(ValueError, match="sr_out"):
        resample(x, 44_100, 0)


def test_to_mono_averages_channels():
    x = np.stack([np.ones(5, np.float32), np.zeros(5, np.float32)], axis=1)
    assert np.array_equal(to_mono(x), np.full(5, 0.5, np.float32))
    assert torch.equal(to_mono(torch.from_numpy(x)), torch.full((5,), 0.5))
    assert to_mono(np.zeros(3)) .shape == (3,)
    with pytest.raises(ValueError, match=r"\(T, C\)"):
        to_mono(np.zeros((2, 3, 4)))


def test_float_to_pcm16_clips_never_wraps_and_zeroes_non_finite():
    x = np.array([0.0, 0.5, 1.0, 1.5, -1.0, -7.0, np.nan, np.inf, -np.inf], np.float32)
    y = float_to_pcm16(x)
    assert y.dtype == np.int16
    assert y.tolist() == [0, 16384, 32767, 32767, -32767, -32767, 0, 0, 0]
    assert float_to_pcm16(torch.tensor([2.0])).tolist() == [32767]


def test_pcm16_roundtrip_and_odd_bytes():
    x = tone(300, 0.1, 16_000)
    b = float_to_pcm16(x).astype("<i2").tobytes()
    y = pcm16_to_float(b)
    assert y.dtype == np.float32 and np.abs(y - x).max() <= 0.5 / 32767 + 1e-7
    assert np.array_equal(pcm16_to_float(np.frombuffer(b, "<i2")), y)
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_to_float(b[:-1])
    with pytest.raises(ValueError, match="int16"):
        pcm16_to_float(np.zeros(4, np.float32))


def test_check_pcm_says_what_to_do():
    ok = np.zeros(100, np.float32)
    assert check_pcm(ok, 16000, 16000) is ok
    cases = [((np.zeros((100, 2), np.float32), 16000), "speech.audio.to_mono"),
             ((ok, 44100), r"speech.audio.resample\(x, 44100, 16000\)"),
             ((np.zeros(0, np.float32), 16000), "empty"),
             ((np.array([0.0, np.nan], np.float32), 16000), "NaN"),
             ((np.zeros(10, np.int16), 16000), "pcm16_to_float")]
    for (x, sr), msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_pcm(x, sr, 16000, name="mic")
    with pytest.raises(ValueError, match="mic"):
        check_pcm(torch.full((4,), float("inf")), 16000, 16000, name="mic")


# --- reading -----------------------------------------------------------------------------------
@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_read_wav_good_files(tmp_path, subtype):
    x = np.stack([tone(440, 0.2, 22_050), tone(660, 0.2, 22_050, 0.25)], axis=1)
    sf.write(tmp_path / "s.wav", x, 22_050, subtype=subtype)
    y, sr = read_wav(tmp_path / "s.wav")
    assert sr == 22_050 and y.shape == x.shape and y.dtype == np.float32
    assert np.abs(y - x).max() < 1e-4


@pytest.mark.parametrize("riff,data", [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (10**6, 10**6),
                                       (0, 10**6), (36 + 3000, 0xFFFFFFFF)])
def test_read_wav_unfinalised_headers(tmp_path, riff, data):
    pcm = float_to_pcm16(tone(440, 0.1, 16_000))                   # 1600 samples
    p = raw_wav(tmp_path / "u.wav", pcm.astype("<i2").tobytes() + b"\x01", riff, data)
    y, sr = read_wav(p)                                            # partial sample dropped
    assert sr == 16_000 and y.shape == (1600,)
    assert np.array_equal(y, pcm16_to_float(pcm))


def test_read_wav_unfinalised_float_stereo(tmp_path):
    x = np.stack([tone(440, 0.1, 8000), tone(880, 0.1, 8000)], axis=1)  # (800, 2)
    payload = x.astype("<f4").tobytes() + b"\x00" * 5                   # 5 B of a frame
    y, sr = read_wav(raw_wav(tmp_path / "f.wav", payload, 0, 0, tag=3, ch=2, sr=8000, bits=32))
    assert sr == 8000 and np.array_equal(y, x)


def test_read_wav_trusts_a_good_header_with_chunks_after_data(tmp_path):
    pcm = float_to_pcm16(tone(440, 0.05, 16_000)).astype("<i2").tobytes()   # 800 samples
    extra = b"LIST" + struct.pack("<I", 8) + b"INFOabcd"
    y, _ = read_wav(raw_wav(tmp_path / "l.wav", pcm, extra=extra))
    assert y.shape == (800,)


@pytest.mark.parametrize("content,what", [
    (b"", "file is empty"), (b"ID3\x03 not a wav at all", "not a WAV file"),
    (b"RIFF\x00\x00\x00\x00WAVE", "no 'fmt ' chunk"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00", "truncated")])
def test_read_wav_corrupt_files_name_the_path_and_problem(tmp_path, content, what):
    p = tmp_path / "bad.wav"
    p.write_bytes(content)
    with pytest.raises(AudioFileError) as e:
        read_wav(p)
    assert str(p) in str(e.value) and what in str(e.value)
    assert isinstance(e.value, ValueError)


def test_load_audio_mono_resampled_and_errors(tmp_path):
    x = np.stack([tone(440, 0.5, 44_100), tone(440, 0.5, 44_100)], axis=1)
    sf.write(tmp_path / "a.wav", x, 44_100)
    y = load_audio(tmp_path / "a.wav")
    assert y.shape == (8000,) and y.dtype == np.float32 and abs(peak_freq(y, 16_000) - 440) < 3
    sf.write(tmp_path / "a.flac", x, 44_100)                    # non-WAV goes via soundfile
    assert np.abs(load_audio(tmp_path / "a.flac", 16_000) - y).max() < 1e-3
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "missing.wav")
    raw_wav(tmp_path / "empty.wav", b"")
    with pytest.raises(AudioFileError, match="no audio samples"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AudioFileError, match="notes.txt"):
        load_audio(tmp_path / "notes.txt")


# --- writing -----------------------------------------------------------------------------------
def _header_sizes(path):
    b = Path(path).read_bytes()
    return struct.unpack("<I", b[4:8])[0], struct.unpack("<I", b[40:44])[0]


def test_wav_appender_flushes_every_flush_seconds_and_finalises(tmp_path):
    p = tmp_path / "w.wav"
    w = WavAppender(p, 16_000, flush_seconds=0.5)
    assert _header_sizes(p) == (0xFFFFFFFF, 0xFFFFFFFF)          # placeholders up front
    w.write(np.zeros(7000, np.float32))
    assert _header_sizes(p) == (0xFFFFFFFF, 0xFFFFFFFF)
    w.write(np.zeros(1500, np.float32))                          # crosses 0.5 s: flushed
    assert _header_sizes(p) == (36 + 17000, 17000)
    w.write(tone(440, 0.1, 16_000))
    assert read_wav(p)[0].shape == (10100,)                      # beyond the last flush
    w.close()
    assert _header_sizes(p) == (36 + 20200, 20200) and w.duration == pytest.approx(10100 / 16000)
    assert sf.info(str(p)).frames == 10100
    with pytest.raises(ValueError, match="to_mono"):
        WavAppender(tmp_path / "x.wav", 16_000).write(np.zeros((4, 2), np.float32))


def test_wav_appender_survives_sigkill(tmp_path):
    """A writer killed mid-stream leaves a file that reads up to the last sample written."""
    p = tmp_path / "killed.wav"
    x = (np.sin(np.arange(40000) * 0.05) * 0.5).astype(np.float32)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: write 2.5 s in 20 ms chunks (flushed at 1 s and 2 s), then hang
        try:
            w = WavAppender(p, 16000, flush_seconds=1.0)
            for i in range(0, 40000, 320):
                w.write(x[i:i + 320])
            os.write(ready_w, b"1")
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    assert _header_sizes(p) == (36 + 64000, 64000)               # last flush: 2.0 s
    y, sr = read_wav(p)
    expected = pcm16_to_float(float_to_pcm16(x))
    assert sr == 16_000 and np.array_equal(y, expected)          # all 2.5 s
    assert load_audio(p).shape == (40000,)
