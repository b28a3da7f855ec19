"""The Gradio app: it serves its page; its handlers run whole turns on a video-file camera
or the demo-world scene with file-backed audio, on browser-streamed chunks, and on a demo
replay; without devices the page shows a notice and the demo scene instead of failing; the
page's buttons, driven with gradio_client against the launched app, start, interrupt and
stop a conversation. Untrained tiny agent, espeak-ng speech."""
import io
import socket
import threading
import re
import time
import urllib.request
import wave

import numpy as np
import pytest

from app.agent import random_agent
from app.demo_scene import DemoScene, DemoSceneOptions
from app.engine import EngineOptions, with_generation
from app.gradio_app import launch, metrics_frame
from app.gradio_handlers import CAMERA, RANDOM, SCENE, LiveController
from app.live import LiveOptions
from app.live_inputs import BrowserDevices, probe_devices
from demo import world as W
from app.session import SessionWriter
from speech.audio import resample
from speech.constants import SAMPLE_RATE
from speech.io import FileSource, MemorySink
from tests.fixtures_audio import speech_clips, synth_speech  # noqa: F401 (fixture)
from tests.media import make_test_video
from tests.test_live import wait_for, write_wav
from vision.camera import Camera

REPLY = with_generation(EngineOptions(), max_text_tokens=4, min_audio_seconds=1.0,
                        max_audio_seconds=1.0)
NO_DEVICES = LiveOptions(camera="/nonexistent/camera.avi", input_device="no-such-microphone",
                         output_device="no-such-speaker", engine=REPLY, user_words=False)
QUIET = LiveOptions(camera=None, engine=REPLY, user_words=False)   # no recogniser: cheap


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


def beeping_scene_options(**kw) -> DemoSceneOptions:
    """Scene options whose first scene beeps."""
    for seed in range(100):
        o = DemoSceneOptions(seed=seed, **kw)
        if DemoScene(o).shown(0.0).scene.beeps:
            return o
    raise AssertionError("no beeping first scene in 100 seeds")


def file_audio(wav):
    """An audio_factory: the microphone is `wav` at real time, the speaker a MemorySink."""
    def factory(agent):
        return (FileSource(wav, realtime=True),
                MemorySink(agent.output_rate, clock=time.monotonic))
    return factory


def user_lines(ctl) -> list[str]:
    return [m["content"] for m in ctl.refresh()[3] if m["role"] == "user"]


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
                     "random (untrained)", "mctp", "Demo-world scene", "New scene",
                     "demo world"):
            assert text in config, text
        for _, template, _ in W.QTYPES.values():   # the questions the model understands
            assert template.split("{")[0] in config, template
        assert ctl.default_source == SCENE           # no camera: the demo scene
        msg = ctl.start_local(RANDOM, "mctp")                   # no raise: a message instead
        assert msg.startswith("⚠ Cannot start") and "Browser devices" in msg
        status, notice, preview, chat, lat, att = ctl.refresh()
        assert "not running" in status and "no-such-microphone" in notice and "Notes" in notice
        assert "demo-world scene" in notice
        assert preview is None and chat == [] and lat.empty and att.empty
    finally:
        demo.close()


def test_local_handlers_run_a_turn(agent, media):
    ctl = LiveController(LiveOptions(camera=str(media["video"]), engine=REPLY,
                                     user_words=False), model=RANDOM,
                         audio_factory=file_audio(media["wav"]), agents={RANDOM: agent})
    assert ctl.models[-1] == RANDOM and ctl.default_source == CAMERA
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
    assert re.fullmatch(r"speech, \d\.\d s", chat[0]["content"])    # no recogniser asked for
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
    ctl = LiveController(QUIET, model=RANDOM, agents={RANDOM: agent})
    assert ctl.browser_mic((48_000, np.zeros(100, np.int16))) is None   # no session yet...
    assert "no browser session is running" in ctl.status_markdown(None)  # ...said, not dropped
    assert list(ctl.browser_voice()) == []
    assert ctl.start_browser(RANDOM, "mctp", CAMERA).startswith("▶")
    assert "Webcam" in ctl.status_markdown(None) and "Record" in ctl.status_markdown(None)
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
    s = ctl.session
    wait_for(lambda: s.sink.queued_seconds() == 0 and s.sink.played_samples > 0, 10,
             "the rest of the reply to play out")
    snap = ctl.snapshot()
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
    assert ctl.browser_mic((48_000, mic48[:4800])) is None      # stopped by the user:
    assert "still records the microphone" in ctl.status_markdown(None)   # says what to do


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
        # the replay finishes once its audio and the reply have played: the clock stops
        wait_for(lambda: ctl.snapshot().status == "finished", 30, "the replay to finish")
        snap = ctl.snapshot()
        sr, audio = ctl.reply_audio(snap)
        wait_for(lambda: not ctl.session.running, 5, "the capture thread to end")
        clock = ctl.snapshot().clock
        status = ctl.status_markdown(ctl.snapshot())
    finally:
        ctl.stop()
    assert "finished (demo)" in status and "Finished: the replay ended" in status
    assert clock == snap.clock and clock < len(media["mic"]) / SAMPLE_RATE + 5
    assert clock >= snap.metrics[-1].first_audio + snap.metrics[-1].reply_seconds
    assert sr == agent.output_rate and np.abs(audio).max() > 1e-3
    assert any("No speaker" in n for n in snap.notices)
    assert snap.preview is not None and set(ctl.attention_frame(snap)["modality"]) == {"audio", "video"}


def red_left_scene() -> W.Scene:
    """A demo-world scene: a red circle on the left, a blue square on the right."""
    bg = W.Background("flat", (20, 20, 30), (20, 20, 30), 0, 0)
    return W.Scene(bg, (W.WorldObject("circle", "red", "left", W.COLORS["red"], 70.0, 120.0),
                        W.WorldObject("square", "blue", "right", W.COLORS["blue"], 70.0, 120.0)),
                   (), (), None)


def red_on_left(bgr: np.ndarray) -> bool:
    b, g, r = np.moveaxis(bgr.astype(int), 2, 0)
    red = (r - g > 100) & (r - b > 100)
    w = bgr.shape[1]
    return red[:, :w // 3].mean() > 0.03 and red[:, 2 * w // 3:].mean() < 0.001


def test_demo_scene_mode_on_this_computer(agent, media, tmp_path):
    """No camera: the agent sees the rendered scene (frames at the camera rate) and hears
    its beeps mixed into the microphone; the page shows the scene, its questions, a new one
    on the button."""
    z = lambda s: np.zeros(int(s * SAMPLE_RATE), np.float32)  # noqa: E731
    wav = write_wav(tmp_path / "mic.wav", np.concatenate([z(2.5), media["question"], z(1.0)]))
    opts = beeping_scene_options(beeps_after=1.0, scene_seconds=0)
    ctl = LiveController(QUIET, model=RANDOM, audio_factory=file_audio(wav),
                         agents={RANDOM: agent}, scene_options=opts)
    assert ctl.default_source == SCENE
    assert ctl.start_local(RANDOM, "vanilla", SCENE, 0).startswith("▶ Live")
    s = ctl.session
    try:
        scene = s.scene.shown(0.0).scene
        assert "Scene 1" in ctl.scene_markdown() and W.describe_scene(scene) in ctl.scene_markdown()
        for q in s.scene.shown(0.0).examples:
            assert q.text in ctl.scene_markdown()
        wait_for(lambda: ctl.snapshot().metrics, 30, "a turn on the demo scene")
        snap = ctl.snapshot()
        # what the agent heard: the beeps (the file is silent there), at their times
        b = scene.beeps[0]
        a = int(round(b.t0 * SAMPLE_RATE))
        heard = s.engine.scene._audio(a, a + int(b.dur * SAMPLE_RATE))
        assert np.allclose(heard, W.beep_wave(b).astype(np.float32), atol=1e-4)
        # what it saw (and the page shows): the world's frames of this scene
        times = np.arange(0, snap.clock, 0.1)
        assert any(np.array_equal(snap.preview, s.scene.frame(t)[..., ::-1]) for t in times)
        assert set(ctl.attention_frame(snap)["modality"]) == {"audio", "video"}
        key, image = ctl.preview_frame()                    # the page's picture
        assert key is not None and image.shape == (240, 320, 3)
        assert "Scene 2" in ctl.new_scene()                  # the button
        assert s.scene.shown(s.clock).index == 1
        sound = ctl.scene_sound(0.1)                         # the page's scene-sound player
        sr, pcm = _wav(next(sound))
        assert sr == SAMPLE_RATE and len(pcm) == SAMPLE_RATE // 10
        assert not any("camera" in n.lower() for n in snap.notices)   # no audio-only note
    finally:
        ctl.stop()
    assert list(sound) == []                                 # the player ends with the session


def test_browser_webcam_frames_reach_the_agent_unmirrored(agent, tmp_path):
    """Gradio's webcam sends frames mirrored like its preview (it draws the video flipped):
    the agent must get the camera's own view. A left/right question about a red circle on
    the left of the scene goes through the browser path; the frames reaching the engine
    have the circle on the left."""
    ctl = LiveController(QUIET, model=RANDOM, agents={RANDOM: agent})
    assert ctl.webcam_mirrored
    assert ctl.start_browser(RANDOM, "vanilla", CAMERA).startswith("▶")
    s = ctl.session
    got, push = [], s.engine.push_frame
    s.engine.push_frame = lambda img, t=None: (got.append(img.copy()), push(img, t))
    camera_view = W.render_frame(red_left_scene(), 0.0)             # BGR
    assert red_on_left(camera_view)
    as_gradio_sends = np.ascontiguousarray(camera_view[:, ::-1, ::-1])   # mirrored, RGB
    q = synth_speech("Where is the red circle?", tmp_path, "q")
    z = np.zeros(int(0.6 * SAMPLE_RATE), np.float32)
    mic = np.concatenate([z, 0.6 * q, z, z, z])
    t0 = time.monotonic()
    try:
        for k in range(0, len(mic), 1600):                        # 0.1 s chunks, 16 kHz
            ctl.browser_frame(as_gradio_sends)
            ctl.browser_mic((SAMPLE_RATE, (mic[k:k + 1600] * 32767).astype(np.int16)))
        wait_for(lambda: ctl.snapshot().metrics, 30, "the answer")
        snap = ctl.snapshot()
    finally:
        ctl.stop()
    assert time.monotonic() - t0 < 60 and len(got) >= 10
    assert all(red_on_left(img) for img in got)
    assert red_on_left(snap.preview[..., ::-1])           # the page shows it the same way
    assert snap.metrics[0].text and set(ctl.attention_frame(snap)["modality"]) == {"audio", "video"}


def test_browser_says_when_webcam_frames_do_not_arrive(agent):
    ctl = LiveController(QUIET, model=RANDOM, agents={RANDOM: agent})
    ctl.start_browser(RANDOM, "vanilla", CAMERA)
    s = ctl.session
    try:
        t0 = time.monotonic() - 4.0
        chunk = np.zeros(1600, np.int16)
        for k in range(40):                                  # 4 s of microphone, no frames
            s.push_mic(SAMPLE_RATE, chunk, now=t0 + 0.1 * (k + 1))
        assert "No webcam frames" in ctl.notices_markdown(ctl.snapshot())
        ctl.browser_frame(np.zeros((240, 320, 3), np.uint8))
        assert s.input_problems() == [] and "webcam" not in ctl.notices_markdown(ctl.snapshot())
    finally:
        ctl.stop()
    ctl.start_browser(RANDOM, "vanilla", SCENE)              # the scene needs no webcam
    s = ctl.session
    try:
        for k in range(40):
            s.push_mic(SAMPLE_RATE, chunk, now=t0 + 0.1 * (k + 1))
        assert s.input_problems() == [] and "Record" in ctl.status_markdown(None)
        assert "Webcam" not in ctl.status_markdown(None)
    finally:
        ctl.stop()


def test_a_reloaded_page_starts_clean(agent, media):
    ctl = LiveController(QUIET, model=RANDOM, agents={RANDOM: agent})
    ctl.start_browser(RANDOM, "vanilla", SCENE)
    s = ctl.session
    s._add(1, "user", "an old question")                    # an old conversation on show
    assert ctl.refresh()[3] and "listening" in ctl.refresh()[0]
    status, notice, preview, chat, lat, att = ctl.page_loaded()
    assert ctl.session is None and not s.running
    assert chat == [] and preview is None and lat.empty and att.empty
    assert "not running" in status and "▶" not in status and "listening" not in status
    assert "Stopped" not in status                          # a fresh page, not a stopped one


def test_the_users_words_are_shown(agent, media):
    """With the recogniser installed (a dev dependency), what the user said replaces
    "speech, 1.4 s" once the reply has been made."""
    opts = LiveOptions(camera=None, engine=REPLY, user_words=True)
    ctl = LiveController(opts, model=RANDOM, audio_factory=file_audio(media["wav"]),
                         agents={RANDOM: agent})
    ctl.start_local(RANDOM, "vanilla", SCENE, 0)
    try:
        wait_for(lambda: ctl.snapshot().metrics, 30, "the turn")
        wait_for(lambda: "red" in " ".join(user_lines(ctl)).lower(), 90, "the user's words")
        said = user_lines(ctl)
    finally:
        ctl.stop()
    assert len(said) == 1 and said[0].startswith("“") and "speech," not in said[0]
    assert "object" in said[0].lower()


def test_page_buttons_drive_a_conversation(agent, media):
    """The page's wiring as a browser drives it, through gradio_client against the launched
    app: Start (demo scene, file-backed microphone with a question), the reply appears in
    the conversation the page polls, Interrupt, New scene, Stop."""
    from gradio_client import Client
    ctl = LiveController(QUIET, model=RANDOM, audio_factory=file_audio(media["wav"]),
                         agents={RANDOM: agent})
    demo, url = launch(ctl, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)

        def page(deadline: float, what: str, cond):
            """Poll the page's timer endpoint until cond(status, notice, chat), the chat as
            [{"role", "content"}] with the content as text."""
            end = time.monotonic() + deadline
            while time.monotonic() < end:
                status, notice, chat, _, _ = client.predict(api_name="/poll")
                chat = [{"role": m["role"], "content": " ".join(
                    c["text"] for c in m["content"] if c.get("type") == "text")} for m in chat]
                if cond(status, notice, chat):
                    return status, chat
                time.sleep(0.2)
            pytest.fail(f"the page never showed {what}: {status!r} {chat!r}")

        status, *_ = client.predict(api_name="/page_loaded")
        assert "not running" in status
        status = client.predict(RANDOM, "vanilla", SCENE, 0, api_name="/start")
        assert status.startswith("▶ Live") and "demo-world scene" in status
        assert ctl.kind == "local" and ctl.session.scene is not None
        _, chat = page(60, "the agent's reply", lambda st, n, chat: any(
            m["role"] == "assistant" and m["content"] not in ("", "…") for m in chat)
            and "turns: 1" in st)
        assert chat[0]["role"] == "user" and chat[0]["content"].startswith("speech, ")
        status = client.predict(api_name="/interrupt")
        assert "Status:" in status
        page(30, "the interruption", lambda st, n, chat: any(
            "(reply interrupted: control)" in m["content"] for m in chat))
        scene_text = client.predict(api_name="/new_scene")
        assert "Scene 2" in scene_text and ctl.session.scene.shown(ctl.session.clock).index == 1
        session = ctl.session
        assert client.predict(api_name="/stop") == "■ Stopped."
        assert ctl.session is None and not session.running
        page(10, "the stopped state", lambda st, n, chat: "not running" in st and not chat)
        assert client.predict(RANDOM, "vanilla", SCENE, 0, api_name="/start").startswith("▶")
        session = ctl.session
        status, _, _, chat, _, _ = client.predict(api_name="/page_loaded")   # a reload
        assert ctl.session is None and not session.running and chat == []
        assert status == "**Status:** not running. "
    finally:
        demo.close()
        ctl.stop()


@pytest.mark.slow
def test_browser_devices_tab_in_chromium(agent, tmp_path):
    """The Browser devices tab in real headless Chromium (Debian's, via Playwright) whose fake
    webcam films a demo-world scene (a red circle on the left) and whose fake microphone asks
    about it: one Start starts the session, the webcam and the microphone; the frames that
    reach the engine are the camera's own view (Gradio's webcam sends them mirrored); the
    reply comes; Stop ends the session and the devices."""
    import cv2
    import soundfile as sf
    from playwright.sync_api import sync_playwright
    from tests.test_browser import launch as chromium
    y4m = tmp_path / "camera.y4m"
    with open(y4m, "wb") as f:
        f.write(b"YUV4MPEG2 W640 H480 F10:1 Ip A1:1 C420jpeg\n")
        frame = W.render_frame(red_left_scene(), 0.0, (640, 480))
        for _ in range(20):
            f.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
    q = synth_speech("Where is the red circle?", tmp_path, "q")
    z = lambda s: np.zeros(int(s * SAMPLE_RATE), np.float32)  # noqa: E731
    wav = tmp_path / "mic.wav"
    sf.write(wav, resample(np.concatenate([z(1.5), 0.7 * q / np.abs(q).max(), z(3.0)]),
                           SAMPLE_RATE, 48_000), 48_000, subtype="PCM_16")
    ctl = LiveController(QUIET, model=RANDOM, agents={RANDOM: agent})
    seen = {"frames": 0, "red_left": 0}
    start_browser = ctl.start_browser

    def start_and_watch(model, mode, source, every):     # what reaches the engine
        msg = start_browser(model, mode, source, every)
        eng = ctl.session.engine
        push = eng.push_frame

        def watched(img, t=None):
            seen["frames"] += 1
            seen["red_left"] += red_on_left(img)
            push(img, t)
        eng.push_frame = watched
        return msg
    ctl.start_browser = start_and_watch
    demo, url = launch(ctl, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    problems = []
    try:
        with sync_playwright() as pw:
            browser = chromium(pw, tmp_path / "profile", wav, y4m)
            try:
                page = browser.new_page()
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.goto(url)
                page.get_by_role("tab", name="Browser devices").click()
                page.get_by_label(CAMERA, exact=True).check()
                page.get_by_role("button", name="▶ Start browser session").click()
                wait_for(lambda: seen["frames"] >= 5, 60, "webcam frames at the engine")
                wait_for(lambda: ctl.session.received_seconds > 1.0, 60, "microphone audio")
                wait_for(lambda: ctl.snapshot().metrics, 90, "the agent's answer")
                assert "Browser session started" in page.locator("#tandem-status").inner_text()
                page.click("#tandem-browser-stop")
                wait_for(lambda: ctl.session is None, 20, "the session to stop")
                page.wait_for_function("() => [...document.querySelectorAll('#tandem-mic "
                                       "button')].some((b) => b.innerText.trim() === 'Record')",
                                       timeout=20_000)          # the microphone stopped too
                # a microphone chunk still in flight must not find a missing session
                status = ctl.status_markdown(None)
                end = time.monotonic() + 1.0
                while time.monotonic() < end and ctl.status_markdown(None) == status:
                    time.sleep(0.05)
                status = ctl.status_markdown(None)
            finally:
                browser.close()
    finally:
        demo.close()
        ctl.stop()
    assert seen["red_left"] == seen["frames"], seen          # never mirrored
    assert status == "**Status:** not running. ■ Stopped." and not problems, (status, problems)


def test_browser_scene_mode_plays_the_beeps_with_the_voice(agent):
    """Browser path on the demo scene: the scene's beeps stream back with the agent's voice,
    at the session clock (the microphone received so far); the webcam is not needed."""
    ctl = LiveController(QUIET, model=RANDOM, agents={RANDOM: agent},
                         scene_options=beeping_scene_options(beeps_after=1.0, scene_seconds=0))
    ctl.start_browser(RANDOM, "vanilla", SCENE)
    s = ctl.session
    try:
        b = s.scene.shown(0.0).scene.beeps[0]
        ctl.browser_frame(np.zeros((240, 320, 3), np.uint8))     # ignored: the scene shows
        assert np.array_equal(s.snapshot().preview, s.scene.frame(0.0)[..., ::-1])
        silent = np.zeros(1600, np.int16)
        t0 = time.monotonic()
        for k in range(int(b.t0 * 10)):                           # the mic up to the beep
            s.push_mic(SAMPLE_RATE, silent, now=t0 + 0.1 * (k + 1))
        sr, pcm = s.pull_reply(b.dur)                             # plays from the clock
    finally:
        ctl.stop()
    assert sr == agent.output_rate
    played = pcm.astype(np.float64) / 32767
    want = W.beep_wave(b, sr)[:len(played)]
    assert np.sqrt(np.mean(played ** 2)) == pytest.approx(np.sqrt(np.mean(want ** 2)), rel=0.1)


@pytest.mark.slow
def test_shipped_model_answers_about_the_demo_scene(tmp_path):
    """The point of the demo-scene mode: the shipped model, on this computer's path (a WAV
    for the microphone), answers questions about the rendered scene it sees and the beeps
    mixed into what it hears. Scene seed 4: a red triangle on the left, a yellow circle in
    the middle, a blue square on the right that beeps twice, high, 1 s after it appears."""
    from app.agent import load_agent
    from speech.tts import Voice, synthesize
    opts = DemoSceneOptions(seed=4, scene_seconds=0)
    examples = {q.text: q.answer for q in DemoScene(opts).shown(0.0).examples}
    asked = ["Where did the sound come from?", "What shape is in the middle?"]   # version 2
    assert [examples[q] for q in asked] == ["the right.", "a circle."]
    x = np.zeros(16 * SAMPLE_RATE, np.float32)
    for text, t in zip(asked, (2.5, 11.0)):                       # beeps at 1 s and 9 s
        q = synthesize(text, Voice("en-us", None, 160, 50), SAMPLE_RATE)
        x[int(t * SAMPLE_RATE):int(t * SAMPLE_RATE) + len(q)] = q * (
            10 ** (-24 / 20) / np.sqrt(np.mean(q ** 2)))
    shipped = "assets/fusion.safetensors"
    ctl = LiveController(LiveOptions(camera=None, user_words=False),
                         audio_factory=file_audio(write_wav(tmp_path / "q.wav", x)),
                         model=shipped, agents={shipped: load_agent()}, scene_options=opts)
    assert ctl.start_local(shipped, "mctp", SCENE, 0).startswith("▶")
    try:
        wait_for(lambda: len(ctl.snapshot().metrics) >= 2, 120, "two answers")
        texts = [m.text.strip() for m in ctl.snapshot().metrics]
    finally:
        ctl.stop()
    assert texts == ["It came from the right.", "It is a circle."]      # version-2 sentences


def test_user_words_transcribe_the_turns_own_audio(monkeypatch):
    """UserWords hands the recogniser exactly the turn's microphone audio (from its speech
    start less QUESTION_PAD), and without a recogniser installed leaves the line alone."""
    from app import live_words
    from speech.constants import QUESTION_PAD
    got, heard = [], []

    class Recogniser:
        def transcribe(self, x):
            heard.append(x)
            return "what color is the circle"
    monkeypatch.setattr(live_words, "recognizer", lambda: Recogniser())
    w = live_words.UserWords(lambda turn, text: got.append((turn, text)))
    mic = np.arange(5 * SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE     # value = its time
    for i0 in range(0, len(mic), 1600):
        w.keep(i0, mic[i0:i0 + 1600])
    w.heard(3, 1.5, 2.5)
    w.transcribe(3)
    wait_for(lambda: got, 10, "the words")
    assert got == [(3, "what color is the circle")]
    x = heard[0]
    assert x[0] == pytest.approx(1.5 - QUESTION_PAD, abs=1e-4) and x[-1] < 2.5
    assert len(x) == int(2.5 * SAMPLE_RATE) - int((1.5 - QUESTION_PAD) * SAMPLE_RATE)
    monkeypatch.setattr(live_words, "recognizer", lambda: None)          # not installed
    monkeypatch.setattr(live_words, "IDLE_EXIT", 0.2)
    w.heard(4, 3.0, 4.0)
    w.transcribe(4)
    w.transcribe(4)                                                       # asked once only
    wait_for(lambda: w._thread is None, 10, "the idle worker to end")
    assert got == [(3, "what color is the circle")] and len(heard) == 1
