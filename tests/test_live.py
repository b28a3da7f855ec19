"""Live conversation on local devices: a spoken question goes into a virtual microphone
(PulseAudio null sinks), a video file stands in for the camera, the reply comes out of the
virtual speaker. Plus barge-in, missing devices, and the pieces (resampler, pull sink)."""
import signal
import subprocess
import threading
import time
import wave

import numpy as np
import pytest

from app.agent import random_agent
from app.engine import EngineOptions, with_generation
from app.live import LiveOptions, LocalDevices
from app.live_inputs import PullSink, attention_series
from speech.resample import StreamResampler, resample_whole
from speech.audio import resample
from speech.constants import SAMPLE_RATE
from speech.io import AudioDeviceError, AudioSource, FileSource, MemorySink
from tests.fixtures_audio import _pactl, pulse_null_sink, speech_clips  # noqa: F401 (fixtures)
from tests.media import make_test_video
from vision.camera import CameraError

REPLY = with_generation(EngineOptions(), max_text_tokens=4, min_audio_seconds=1.0,
                        max_audio_seconds=1.0)


@pytest.fixture(scope="module")
def agent():
    return random_agent("tiny")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_test_video(tmp_path_factory.mktemp("video") / "cam.avi", seconds=2.0)


def write_wav(path, pcm, sr=SAMPLE_RATE):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def virtual_mic(pulse_null_sink):  # noqa: F811
    """A second null sink whose monitor is the default source: what is played into it is
    what the microphone hears; the first null sink stays the speaker."""
    srv = pulse_null_sink.server
    r = _pactl(srv, "load-module", "module-null-sink", "sink_name=tandem_mic", "rate=16000")
    assert r.returncode == 0, r.stderr
    module = r.stdout.strip()
    assert _pactl(srv, "set-default-source", "tandem_mic.monitor").returncode == 0
    yield pulse_null_sink
    _pactl(srv, "set-default-source", pulse_null_sink.monitor)
    _pactl(srv, "unload-module", module)


def test_spoken_question_through_virtual_sound_devices(agent, video, virtual_mic, speech_clips,
                                                       tmp_path):  # noqa: F811
    srv = virtual_mic.server
    question = write_wav(tmp_path / "q.wav", 0.6 * speech_clips[0])
    spk = tmp_path / "speaker.raw"
    rec = subprocess.Popen(["parecord", "--server", srv, f"--device={virtual_mic.monitor}",
                            "--raw", "--format=float32le", "--rate=16000", "--channels=1",
                            str(spk)])
    opts = LiveOptions(camera=str(video), input_device="pulse", output_device="pulse",
                       engine=REPLY)
    live = LocalDevices(agent, opts).start()
    try:
        assert live.running and live.snapshot().notices == ()
        wait_for(lambda: live.snapshot().clock > 0.3, 15, "microphone audio")  # monitor warm-up
        assert live.snapshot().preview is not None                    # camera frames flow
        subprocess.run(["paplay", "--server", srv, "--device=tandem_mic", str(question)],
                       check=True, timeout=30)                         # "speak" into the mic
        wait_for(lambda: live.snapshot().metrics, 30, "the end of the turn and its reply")
        wait_for(lambda: live.sink.queued_seconds() == 0, 10, "the reply to finish playing")
        reply = live.snapshot().metrics[0].reply_seconds
        wait_for(lambda: (np.abs(np.fromfile(spk, np.float32)) > 1e-3).sum()   # server-side
                 > 0.5 * reply * SAMPLE_RATE, 20, "the reply on the speaker's monitor")  # latency
    finally:
        live.stop()
        rec.send_signal(signal.SIGINT)
        rec.wait(10)
    snap = live.snapshot()
    m = snap.metrics[0]
    assert m.turn == 1 and not m.interrupted and m.reply_seconds == pytest.approx(1.0, rel=0.1)
    q_len = len(speech_clips[0]) / SAMPLE_RATE
    assert abs((m.speech_end - m.speech_start) - q_len) < 0.3, (m, q_len)
    assert m.compute_latency > 0 and m.response_latency >= m.compute_latency
    assert [t.role for t in snap.transcript] == ["user", "assistant"]
    kinds = {k for k, _, _ in attention_series(snap.attention)}
    assert kinds == {"audio", "video"}, kinds
    heard = np.fromfile(spk, np.float32)
    loud = np.abs(heard) > 1e-3
    # the reply reached the speaker sink: about reply_seconds of non-silent audio on its monitor
    assert loud.sum() > 0.5 * m.reply_seconds * SAMPLE_RATE, (loud.sum(), len(heard))
    assert snap.status == "stopped" and not live.running


class Mic(AudioSource):
    """A microphone in real time: silence until `say(pcm)` queues speech (20 ms chunks)."""
    sample_rate = SAMPLE_RATE

    def __init__(self):
        self._queue, self._lock, self._t0, self._n = [], threading.Lock(), None, 0
        self.closed = False

    def say(self, pcm):
        with self._lock:
            self._queue.extend(np.array_split(pcm, max(1, len(pcm) // 320)))

    def read(self, timeout=None):
        if self.closed:
            return None
        now = time.monotonic()
        self._t0 = now if self._t0 is None else self._t0
        wait = self._t0 + (self._n + 320) / SAMPLE_RATE - now
        if timeout is not None and wait > timeout:
            time.sleep(timeout)
            return np.zeros(0, np.float32)
        time.sleep(max(0.0, wait))
        with self._lock:
            chunk = self._queue.pop(0) if self._queue else np.zeros(320, np.float32)
        self._n += len(chunk)
        return chunk.astype(np.float32)

    def close(self):
        self.closed = True


def test_barge_in_clears_the_speaker(agent, speech_clips):  # noqa: F811
    """A real-time mic (same LocalDevices path): a second question while the reply plays, with
    more of it queued, interrupts it; the sink drops the queued audio and keeps none of it.
    The speaker plays at quarter speed (its clock runs slow), so the reply is still queued
    at the barge-in however fast or slow this CPU generates it."""
    q1, q2 = speech_clips
    mic, sink = Mic(), MemorySink(agent.output_rate, clock=lambda: time.monotonic() / 4)
    opts = LiveOptions(camera=None, engine=with_generation(
        EngineOptions(), max_text_tokens=4, min_audio_seconds=4.0, max_audio_seconds=4.0))  # capped by the KV cache
    live = LocalDevices(agent, opts, source=mic, sink=sink).start()
    try:
        wait_for(lambda: live.snapshot().clock > 0.3, 15, "microphone audio")
        mic.say(0.6 * q1)
        wait_for(lambda: sink.queued_seconds() > 0.5, 30, "the reply playing with more queued")
        mic.say(0.6 * q2)                                        # the user talks over it
        wait_for(lambda: any(t.role == "system" for t in live.snapshot().transcript), 30,
                 "the barge-in")
        dropped, written = sink.cleared_samples, live.snapshot().reply_audio_seconds
        queued = sink.queued_seconds()       # q2 is still being spoken: no new reply yet
        wait_for(lambda: len(live.snapshot().metrics) >= 1, 30, "turn 1's metrics")
    finally:
        live.stop()
    snap = live.snapshot()
    assert "barge-in" in [t for t in snap.transcript if t.role == "system"][0].text
    # the queued rest of the reply was dropped, never played (tiny's cache caps it at ~1.3 s)
    assert 0.1 * agent.output_rate < dropped < written * agent.output_rate, (dropped, written)
    assert queued == 0.0, queued                             # nothing of it stayed queued
    assert "No camera selected" in snap.notices[0]


def test_missing_devices_give_clear_errors(agent, speech_clips, tmp_path):  # noqa: F811
    with pytest.raises(AudioDeviceError, match="no-such-microphone"):
        LocalDevices(agent, LiveOptions(camera=None, input_device="no-such-microphone")).start()
    mic = write_wav(tmp_path / "mic.wav", np.zeros(SAMPLE_RATE, np.float32))
    src, sink = FileSource(mic), MemorySink(agent.output_rate)
    strict = LiveOptions(camera=str(tmp_path / "nope.avi"), require_camera=True)
    with pytest.raises(CameraError, match="nope.avi"):
        LocalDevices(agent, strict, source=src, sink=sink).start()
    assert src.read() is None                                 # what it was given is closed
    live = LocalDevices(agent, LiveOptions(camera=str(tmp_path / "nope.avi")),
                        source=FileSource(mic, realtime=True), sink=MemorySink(agent.output_rate))
    with live:                                                # no camera: audio-only, says so
        wait_for(lambda: live.snapshot().clock > 0.2, 10, "audio")
        assert live.running
        notes = live.snapshot().notices
        assert notes[0].startswith("No camera: running audio-only") and "nope.avi" in notes[0]
    with pytest.raises(RuntimeError, match="runs once"):
        live.start()


@pytest.mark.parametrize("sr_in,sr_out", [(48_000, 16_000), (16_000, 24_000), (44_100, 16_000)])
def test_stream_resampler_chunked_equals_offline(sr_in, sr_out):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(sr_in).astype(np.float32) * 0.3
    rs = StreamResampler(sr_in, sr_out)
    cuts = np.sort(rng.integers(0, len(x), 12))
    parts = [rs.feed(c) for c in np.split(x, cuts)]
    y = np.concatenate(parts + [rs.flush()])
    ref = resample_whole(x, sr_in, sr_out)
    assert len(y) == len(ref) == round(len(x) * sr_out / sr_in), (len(y), len(ref))
    np.testing.assert_allclose(y, ref, atol=1e-6)
    # torchaudio's offline resampler (the model's) on this full-band noise: the two filters
    # differ only near the new Nyquist
    n = min(len(y), len(ref)) - 64
    assert np.corrcoef(y[64:n], resample(x, sr_in, sr_out)[64:n])[0, 1] > 0.98
    early = np.concatenate(parts)                            # later input never changes it
    np.testing.assert_array_equal(y[:len(early)], early)


def test_pull_sink_plays_at_the_pull_rate():
    s = PullSink(16_000, max_seconds=1.0)
    assert not s.pull(100).any()                             # silence when nothing is queued
    s.write(np.ones(150, np.float32))
    a, b = s.pull(100), s.pull(100)
    assert a.sum() == 100 and b[:50].sum() == 50 and not b[50:].any()
    s.write(np.ones(2 * 16_000, np.float32))                 # bounded: the oldest is dropped
    assert s.queued_seconds() == pytest.approx(1.0, abs=0.01)
    s.clear()
    assert s.queued_seconds() == 0 and not s.pull(10).any()
