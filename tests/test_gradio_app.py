"""The Gradio app: it serves its page; its handlers run whole turns on a video-file camera
with file-backed audio, on browser-streamed chunks, and on a demo replay; without devices
the page shows a notice instead of failing. Untrained tiny agent, espeak-ng speech."""
import io
import socket
import threading
import time
import urllib.request
import wave

import numpy as np
import pytest

from app.agent import random_agent
from app.engine import EngineOptions, with_generation
from app.gradio_app import launch, metrics_frame
from app.gradio_handlers import RANDOM, LiveController
from app.live import LiveOptions
from app.live_inputs import BrowserDevices, probe_devices
from app.session import SessionWriter
from speech.audio import resample
from speech.constants import SAMPLE_RATE
from speech.io import FileSource, MemorySink
from tests.fixtures_audio import speech_clips  # noqa: F401 (fixture)
from tests.media import make_test_video
from tests.test_live import wait_for, write_wav
from vision.camera import Camera

REPLY = with_generation(EngineOptions(), max_text_tokens=4, min_audio_seconds=1.0,
                        max_audio_seconds=1.0)
NO_DEVICES = LiveOptions(camera="/nonexistent/camera.avi", input_device="no-such-microphone",
                         output_device="no-such-speaker", engine=REPLY)


@pytest.fixture(scope="module")
def agent():
    return random_agent("tiny")


@pytest.fixture(scope="module")
def media(tmp_path_factory, speech_clips):  # noqa: F811
    d = tmp_path_factory.mktemp("media")
    z = lambda s: np.zeros(int(s * SAMPLE_RATE), np.float32)  # noqa: E731
    mic = np.concatenate([z(0.4), 0.6 * speech_clips[0], z(1.0)])
    return dict(video=make_test_video(d / "cam.avi", seconds=2.0), mic=mic,
                wav=write_wav(d / "mic.wav", mic), question=0.6 * speech_clips[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_served_with_a_notice_when_there_are_no_devices(agent):
    notices = probe_devices(NO_DEVICES)
    assert len(notices) == 2 and "no-such-microphone" in notices[0] and "camera" in notices[1]
    ctl = LiveController(NO_DEVICES, model=RANDOM, notices=notices, agents={RANDOM: agent})
    demo, url = launch(ctl, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and "<html" in r.read().decode().lower()
        with urllib.request.urlopen(url + "config", timeout=30) as r:
            config = r.read().decode()
        for text in ("Tandem", "no-such-microphone", "Browser devices", "Demo replay",
                     "random (untrained)", "mctp"):
            assert text in config, text
        msg = ctl.start_local(RANDOM, "mctp")                   # no raise: a message instead
        assert msg.startswith("⚠ Cannot start") and "Browser devices" in msg
        status, notice, preview, chat, lat, att = ctl.refresh()
        assert "not running" in status and "no-such-microphone" in notice and "Notes" in notice
        assert preview is None and chat == [] and lat.empty and att.empty
    finally:
        demo.close()


def test_local_handlers_run_a_turn(agent, media):
    def audio(agent):
        return (FileSource(media["wav"], realtime=True),
                MemorySink(agent.output_rate, clock=time.monotonic))
    ctl = LiveController(LiveOptions(camera=str(media["video"]), engine=REPLY), model=RANDOM,
                         audio_factory=audio, agents={RANDOM: agent})
    assert ctl.models[-1] == RANDOM
    assert ctl.start_local(RANDOM, "vanilla").startswith("▶")
    try:
        wait_for(lambda: not ctl.refresh()[4].empty, 30, "a turn's latencies")
        wait_for(lambda: ctl.refresh()[1], 5, "the end of the audio file")
        status, notice, preview, chat, lat, att = ctl.refresh()
    finally:
        ctl.stop()
    assert set(lat["kind"]) == {"response", "compute"} and (lat["latency_ms"] > 0).all()
    assert set(att["modality"]) == {"audio", "video"}
    n_clues = agent.model.config.n_clues            # each clue's attention sums to 1
    assert att["weight"].sum() == pytest.approx(n_clues, rel=1e-3)
    assert (att["t"] <= 0.05).all() and att["t"].min() < -1.0   # times before the question's end
    assert preview.shape == (240, 320, 3) and preview.dtype == np.uint8
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert "turns: 1" in status and "audio input ended" in notice   # the file ran out
    table = metrics_frame(ctl.session.snapshot() if ctl.session else None)
    assert table.empty                                   # stopped: no session shown
    assert ctl.session is None and "Stopped" in ctl.status_markdown(None)


def _wav(data: bytes) -> tuple[int, np.ndarray]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")


def test_browser_stream_handlers_reply(agent, media):
    """Mic chunks (48 kHz int16, as Gradio's recorder sends them) and webcam frames (RGB)
    at real-time pace; the voice generator streams the reply back as WAV chunks."""
    ctl = LiveController(LiveOptions(camera=None, engine=REPLY), model=RANDOM,
                         agents={RANDOM: agent})
    assert ctl.browser_mic((48_000, np.zeros(100, np.int16))) is None   # no session yet
    assert list(ctl.browser_voice()) == []
    assert ctl.start_browser(RANDOM, "mctp").startswith("▶")
    assert isinstance(ctl.session, BrowserDevices)
    voice = []
    player = threading.Thread(target=lambda: voice.extend(ctl.browser_voice(0.1)), daemon=True)
    player.start()
    frames = [f.image[..., ::-1] for f in Camera(str(media["video"])).frames()]   # RGB
    z = np.zeros(int(0.5 * SAMPLE_RATE), np.float32)
    mic48 = (resample(np.concatenate([z, media["question"], z, z, z, z]), SAMPLE_RATE, 48_000)
             * 32767).astype(np.int16)
    step, t0, k, lost = 4_800, time.monotonic(), 0, 0    # 0.1 s chunks at 48 kHz
    while k * step < len(mic48):
        slot = t0 + (k + 1) * 0.1                        # when chunk k is recorded
        time.sleep(max(0.0, slot - time.monotonic()))
        late = int((time.monotonic() - slot) / 0.1)      # like Gradio's recorder: chunks
        k, lost = k + late, lost + late                  # recorded while busy are lost
        chunk = mic48[k * step:(k + 1) * step]
        ctl.browser_frame(frames[k % len(frames)])
        ctl.browser_mic((48_000, np.stack([chunk, chunk], 1) if k % 2 else chunk))  # stereo too
        k += 1
    wait_for(lambda: ctl.snapshot().metrics, 10, "the end of the reply")
    time.sleep(1.2)                                      # the rest of the reply plays out
    snap, s = ctl.snapshot(), ctl.session
    ctl.stop()
    player.join(2)
    assert not player.is_alive()                         # the generator ends with the session
    got = [_wav(b) for b in voice]
    assert {sr for sr, _ in got} == {agent.output_rate}
    assert {len(x) for _, x in got} == {agent.output_rate // 10}
    out = np.concatenate([x for _, x in got])
    assert (np.abs(out) > 30).sum() > 0.5 * agent.output_rate * snap.metrics[0].reply_seconds
    # only lost chunks become silence (filling in detail: the next test); the session clock
    # never runs ahead of the microphone's real time (it may trail what was received by the
    # block the streaming resampler holds back: under 40 ms from 48 kHz, speech/resample.py)
    assert s.filled_seconds <= 0.1 * lost + 0.2, (s.filled_seconds, lost)
    assert s.received_seconds - 0.04 <= snap.clock <= k * 0.1 + 0.2
    assert len(snap.metrics) == 1 and snap.metrics[0].response_latency is not None
    assert snap.preview is not None and snap.preview.shape == frames[0].shape
    assert set(ctl.attention_frame(snap)["modality"]) == {"audio", "video"}


def test_browser_dropped_audio_becomes_silence_with_a_notice(agent):
    s = BrowserDevices(agent, LiveOptions(camera=None))
    chunk = np.full(4_800, 1000, np.int16)               # 0.1 s at 48 kHz...
    arrivals = 100.0 + 0.3 * np.arange(20)               # ...arriving every 0.3 s,
    arrivals[10:] += 1.0                                 # and one 1.3 s stall
    for now in arrivals:
        s.push_mic(48_000, chunk, now=now)
    snap = s.snapshot()
    s.stop()
    assert s.received_seconds == pytest.approx(2.0)
    # gaps become silence (0.2 s each); the stall's only up to 0.3 s: it must not end a turn
    assert s.filled_seconds == pytest.approx(0.2 * 18 + 0.3, abs=0.01)
    held = 2.0 + 0.2 * 18 + 0.3 - snap.clock            # the resampler's block (48 kHz)
    assert 0 <= held < 0.04
    assert "losing audio" in snap.notices[0]


def test_demo_replay_without_a_speaker_shows_the_reply(agent, media, tmp_path):
    root = tmp_path / "sessions"
    with SessionWriter(root / "demo1") as w:
        w.write_audio(media["mic"])
        for f in Camera(str(media["video"]), loop=True).frames():
            if f.t >= len(media["mic"]) / SAMPLE_RATE:
                break
            w.write_frame(f.t, f.image)
    ctl = LiveController(NO_DEVICES, model=RANDOM, sessions_dir=root, agents={RANDOM: agent})
    assert ctl.demo_sessions() == [str(root / "demo1")]
    assert ctl.start_demo(None, RANDOM, "mctp").startswith("⚠ No recorded session")
    assert ctl.start_demo(ctl.demo_sessions()[0], RANDOM, "mctp").startswith("▶ Replaying")
    try:
        wait_for(lambda: ctl.snapshot().metrics, 30, "the replayed turn")
        wait_for(lambda: ctl.reply_audio(ctl.snapshot()) is not None, 10, "reply audio")
        snap = ctl.snapshot()
        sr, audio = ctl.reply_audio(snap)
    finally:
        ctl.stop()
    assert sr == agent.output_rate and np.abs(audio).max() > 1e-3
    assert any("No speaker" in n for n in snap.notices)
    assert snap.preview is not None and set(ctl.attention_frame(snap)["modality"]) == {"audio", "video"}
