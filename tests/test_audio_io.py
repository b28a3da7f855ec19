"""speech.io: file source, memory / WAV sinks, and the PortAudio duplex device on a real
(virtual) sound card: a PulseAudio null sink whose monitor is the microphone."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from speech.audio import load_audio, read_wav, WavAppender
from speech.io import (AudioDeviceError, DuplexDevice, FileSource, MemorySink, WavSink,
                       list_devices)
from tests.fixtures_audio import pulse_null_sink  # noqa: F401  (pytest fixture)

SR = 16_000
ROOT = Path(__file__).parents[1]


def tone(freq, seconds, sr=SR, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(x, sr=SR):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


@pytest.fixture
def wav_file(tmp_path):
    path = tmp_path / "in.wav"
    with WavAppender(path, 22_050) as w:
        w.write(tone(440, 0.5, sr=22_050))
    return path


def test_file_source_chunks_equal_the_loaded_file(wav_file):
    whole = load_audio(wav_file, SR)
    with FileSource(wav_file, SR, chunk_seconds=0.03) as src:
        chunks = list(src)
        assert src.read() is None
    assert all(c.shape == (480,) for c in chunks[:-1]) and 0 < chunks[-1].shape[0] <= 480
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


def test_file_source_realtime_pacing_and_timeout(wav_file):
    src = FileSource(wav_file, SR, chunk_seconds=0.1, realtime=True)
    t0 = time.monotonic()
    assert src.read(timeout=0.01).size == 0          # first chunk is 0.1 s away
    got = []
    while (c := src.read(timeout=1.0)) is not None:
        got.append(c)
    elapsed = time.monotonic() - t0
    assert sum(c.shape[0] for c in got) == 8000
    assert elapsed >= 0.45, elapsed                  # never ahead of real time (5 x 0.1 s)
    assert elapsed < 5.0, elapsed                    # and not stuck (generous: busy cores)
    src.close()
    assert src.read() is None


def test_memory_sink_plays_on_a_clock_and_clear_drops_the_queue():
    now = [100.0]
    sink = MemorySink(SR, clock=lambda: now[0])
    sink.write(np.ones(SR, np.float32))           # 1 s
    sink.write(np.full(SR, 0.5, np.float32))      # +1 s
    assert sink.queued_seconds() == pytest.approx(2.0)
    now[0] += 0.25
    assert sink.queued_seconds() == pytest.approx(1.75)
    sink.clear()
    assert sink.queued_seconds() == 0.0
    assert sink.audio.shape == (4000,) and sink.cleared_samples == 28000
    now[0] += 1.0                                 # idle: next write starts now
    sink.write(np.zeros(800, np.float32))
    assert sink.queued_seconds() == pytest.approx(0.05)
    offline = MemorySink(SR)
    offline.write(np.ones(10, np.float32))
    offline.clear()
    assert offline.queued_seconds() == 0.0 and offline.audio.shape == (10,)
    with pytest.raises(ValueError, match="to_mono"):
        offline.write(np.zeros((10, 2), np.float32))


def test_wav_sink_writes_a_readable_file(tmp_path):
    a, b = tone(300, 0.2, sr=24_000), tone(500, 0.1, sr=24_000, amp=0.25)
    with WavSink(tmp_path / "out.wav", 24_000) as sink:
        sink.write(a)
        sink.write(b)
        assert sink.queued_seconds() == 0.0
        sink.clear()                                   # played instantly: nothing to drop
    x, sr = read_wav(tmp_path / "out.wav")
    assert sr == 24_000 and x.shape == (7200,)
    np.testing.assert_allclose(x, np.concatenate([a, b]), atol=1.5 / 32768)  # PCM16, in order


def test_missing_portaudio_names_the_package(tmp_path):
    # sounddevice's real import with the library lookup failing as on a system without it
    code = textwrap.dedent("""
        import ctypes.util
        ctypes.util.find_library = lambda name: None
        from speech.io import list_devices, AudioDeviceError
        try:
            list_devices()
        except AudioDeviceError as e:
            print("ERR", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=str(ROOT))
    assert "ERR PortAudio not found: apt-get install libportaudio2" in r.stdout, r.stderr


def test_no_sound_server_means_no_default_device_with_a_helpful_message(tmp_path):
    # no sound server: PortAudio sees no devices here; a machine with a real sound card
    # still has one, so there PortAudio's "no device" (-1) is set as the default instead
    code = textwrap.dedent("""
        from speech.io import DuplexDevice, AudioDeviceError, list_devices
        if list_devices():
            import sounddevice
            sounddevice.default.device = (-1, -1)
        try:
            DuplexDevice()
        except AudioDeviceError as e:
            print("ERR", e)
    """)
    env = {"PATH": "/usr/bin:/bin", "PULSE_SERVER": f"unix:{tmp_path}/nothing-here",
           "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=env, cwd=str(ROOT))
    assert "ERR no default input device" in r.stdout, (r.stdout, r.stderr)
    assert "--input-device/--output-device" in r.stdout and "Available devices" in r.stdout


def test_unknown_device_lists_the_available_ones(pulse_null_sink):
    names = [d["name"] for d in list_devices()]
    assert pulse_null_sink.device in names
    with pytest.raises(AudioDeviceError) as e:
        DuplexDevice(input_device="no-such-microphone", output_device=pulse_null_sink.device)
    msg = str(e.value)
    assert "no-such-microphone" in msg and "pulse" in msg and "--input-device" in msg


def _record(src, seconds):
    got, n = [], 0
    deadline = time.monotonic() + seconds * 3 + 2
    while n < seconds * SR and time.monotonic() < deadline:
        c = src.read(timeout=0.5)
        assert c is not None
        got.append(c)
        n += c.shape[0]
    return np.concatenate(got)


def _wait_for_input(src, timeout=10.0):
    """PulseAudio's null-sink monitor starts delivering ~2 s after the streams open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if src.read(timeout=0.5).size:
            return
    pytest.fail(f"no microphone audio within {timeout} s")


@pytest.mark.parametrize("output_rate", [SR, 24_000])
def test_duplex_device_loopback_through_a_null_sink(pulse_null_sink, output_rate):
    """A tone played to the speaker comes back on the mic (the sink's monitor); clear()
    silences the rest of a long reply within the sound server's latency."""
    dev = pulse_null_sink.device
    with DuplexDevice(dev, dev, input_rate=SR, output_rate=output_rate) as d:
        _wait_for_input(d.source)
        silence = _record(d.source, 0.3)
        assert np.abs(silence).max() < 0.01
        d.sink.write(tone(1000, 0.6, sr=output_rate))
        rec = _record(d.source, 1.5)
        loud = np.abs(rec) > 0.1
        assert loud.sum() > 0.4 * SR, loud.sum()                 # ~0.6 s of tone came back
        seg = rec[np.nonzero(loud)[0][0]:][:int(0.4 * SR)]
        assert abs(dominant_freq(seg) - 1000) < 10, dominant_freq(seg)
        assert np.abs(seg).max() == pytest.approx(0.5, abs=0.08)

        d.sink.write(tone(700, 5.0, sr=output_rate))            # a long reply...
        assert d.sink.queued_seconds() > 4.0
        rec = _record(d.source, 0.5)
        assert (np.abs(rec) > 0.1).sum() > 0.1 * SR             # ...is playing
        d.sink.clear()                                          # barge-in
        assert d.sink.queued_seconds() == 0.0
        rec = _record(d.source, 2.5)
        loud = np.abs(rec) > 0.01
        # what was already in the sound server plays out (its latency), the 4 s left never do
        assert loud.sum() < 1.0 * SR, loud.sum() / SR
        assert not loud[-SR:].any(), np.abs(rec[-SR:]).max()
        assert d.stats["dropped_input_blocks"] == 0, d.stats
    assert d.source.read() is None
    with pytest.raises(AudioDeviceError):
        d.sink.write(np.zeros(10, np.float32))


def test_a_stopped_stream_is_reported_not_waited_on(pulse_null_sink):
    dev = pulse_null_sink.device
    with pytest.raises(ValueError, match="duplex=False"):
        DuplexDevice(dev, dev, output_rate=24_000, duplex=True)
    with DuplexDevice(dev, dev) as d:
        d._streams[0].abort()                                   # the mic stream dies
        with pytest.raises(AudioDeviceError, match="stopped"):
            while True:
                d.source.read(timeout=0.2)
