"""The browser client end to end: headless Chromium (Debian's, through Playwright) with fake
camera and microphone devices fed from files, talking to a real server on 127.0.0.1.

Set TANDEM_SCREENSHOT=PATH to also keep a screenshot of the page."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from app.agent import random_agent
from app.server import ServerOptions, ServerThread
from app.session import load_session
from speech.audio import resample
from speech.constants import SAMPLE_RATE
from tests.fixtures_audio import synth_speech

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.slow


def demo_scene(i: int, n: int, w: int = 640, h: int = 480) -> np.ndarray:
    """A frame in the demo world's look: dark gradient, three shapes in the three slots,
    the left one pulsing."""
    a = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = (np.array([40, 25, 20], np.float32) * (1 - a) + np.array([70, 45, 30], np.float32) * a
           + np.zeros((1, w, 1), np.float32)).astype(np.uint8)
    r = int(70 * (1 + 0.15 * max(0.0, np.sin(4 * np.pi * i / n))))
    cv2.circle(img, (int(0.2 * w), h // 2), r, (40, 40, 220), -1, cv2.LINE_AA)
    cv2.rectangle(img, (w // 2 - 65, h // 2 - 65), (w // 2 + 65, h // 2 + 65), (230, 90, 50), -1)
    cx = int(0.8 * w)
    tri = np.array([(cx, h // 2 - 70), (cx + 75, h // 2 + 60), (cx - 75, h // 2 + 60)])
    cv2.fillPoly(img, [tri], (40, 210, 230), cv2.LINE_AA)
    return img


def write_y4m(path: Path, n: int = 40, fps: int = 10) -> Path:
    """Chromium's fake camera file: YUV4MPEG2, 4:2:0."""
    w, h = 640, 480
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(n):
            f.write(b"FRAME\n" + cv2.cvtColor(demo_scene(i, n, w, h), cv2.COLOR_BGR2YUV_I420).tobytes())
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """(wav, y4m): 2 s of silence, a spoken question, 4 s of silence (48 kHz PCM16; Chromium
    loops it) and the demo-look video."""
    d = tmp_path_factory.mktemp("media")
    q = synth_speech("What is the red object on the left?", d, "q")
    z = lambda s: np.zeros(int(s * SAMPLE_RATE), np.float32)  # noqa: E731
    x = np.concatenate([z(2.0), 0.8 * q / np.abs(q).max(), z(4.0)])
    wav = d / "mic.wav"
    sf.write(wav, resample(x, SAMPLE_RATE, 48000), 48000, subtype="PCM_16")
    return wav, write_y4m(d / "camera.y4m")


def launch(pw, user_data: Path, wav: Path, y4m: Path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make system-dev` (apt-get install chromium)")
    return pw.chromium.launch_persistent_context(
        str(user_data), executable_path=CHROMIUM, headless=True,
        viewport={"width": 1200, "height": 760},
        args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
              f"--use-file-for-fake-audio-capture={wav}", f"--use-file-for-fake-video-capture={y4m}",
              "--autoplay-policy=no-user-gesture-required"])


def first_turn(page, timeout: float = 60.0) -> dict:
    """The page's stats once its first turn has been heard (fails on page errors)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = page.evaluate("window.tandemStats")
        if stats["turns"] >= 1 and stats["lastResponseLatency"] is not None:
            return stats
        assert not stats["errors"], stats["errors"]
        time.sleep(0.25)
    pytest.fail(f"no turn within {timeout:g} s: {page.evaluate('window.tandemStats')}")


def test_browser_conversation(media, tmp_path):
    from playwright.sync_api import sync_playwright
    wav, y4m = media
    rec = tmp_path / "rec"
    problems: list[str] = []
    with ServerThread(random_agent("tiny"), ServerOptions(port=0, record_dir=str(rec))) as server, \
            sync_playwright() as pw:
        browser = launch(pw, tmp_path / "profile", wav, y4m)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(server.url)
            assert page.text_content("#status") == "not connected"
            page.click("#start")
            stats = first_turn(page)
            page.wait_for_timeout(500)
            row = [c.strip() for c in page.locator("#turns tr").last.locator("td").all_text_contents()]
            agent_said = page.locator(".bubble.agent").first.text_content()
            about = page.text_content("#about")
            legend = page.text_content("#latency-legend")
            titles = page.eval_on_selector_all("th[data-latency]", "els => els.map(e => e.title)")
            shot = tmp_path / "client.png"
            page.screenshot(path=str(shot))
            if os.environ.get("TANDEM_SCREENSHOT"):
                shutil.copy(shot, os.environ["TANDEM_SCREENSHOT"])
            page.click("#start")                                  # stop
            assert page.text_content("#status") == "stopped"
            sessions = list(rec.iterdir())
        finally:
            browser.close()
    # the page got the turn's events and non-silent reply audio, and shows them
    assert stats["state"] == "live" and stats["session"] and stats["outputRate"] == 16000
    assert stats["audioBytes"] > 0.2 * 2 * 16000 and stats["audioRms"] > 0.01
    assert 0.3 < stats["lastServerLatency"] < 10 and 0.3 < stats["lastResponseLatency"] < 10
    assert 0 < stats["lastComputeLatency"] < 10 and 0 < stats["lastWait"] < 10
    # response (heard here) = end-of-turn wait + compute + transport and playback
    assert stats["lastResponseLatency"] > stats["lastWait"] + stats["lastComputeLatency"]
    assert row[0] == "1" and row[1] and all(c.endswith(" ms") for c in row[2:5]), row
    # the page says what the model knows, the questions it understands and the latency words
    assert "demo world" in about and "Which object made the sound?" in about
    assert all(c in about for c in ("red", "triangle", "middle", "high or low"))
    assert "response latency = end of the user's speech to the first reply sound heard" in legend
    assert titles == ["response latency: end of the user's speech to the first reply sound heard",
                      "end-of-turn wait: end of the user's speech to the end-of-turn decision "
                      "(the silence the agent waits for before it answers)",
                      "compute latency: end-of-turn decision to the first reply audio ready"]
    assert agent_said and agent_said != "…" and not problems, problems
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the server received 16 kHz audio and JPEG frames from the browser's devices
    assert len(sessions) == 1
    s = load_session(sessions[0])
    assert s.meta["source"] == "browser" and "Chrome" in s.meta["user_agent"]
    assert len(s.audio) / SAMPLE_RATE > 3.0 and np.abs(s.audio).max() > 0.1
    assert stats["framesSent"] >= 8 and len(s.frames) >= 8
    frame = s.read_frame(len(s.frames) // 2)
    assert frame.shape == (240, 320, 3)
    # the red circle is on the left of the frame the server got, not on the right
    b, g, r = np.moveaxis(frame.astype(int), 2, 0)
    red = (r - g > 100) & (r - b > 100)
    assert red[:, :100].mean() > 0.05 and red[:, 220:].mean() < 0.01
    types = {e["type"] for e in s.events}
    assert {"speech_start", "speech_end", "turn_end", "turn_done"} <= types, types


def test_browser_turn_taking_with_the_predictor(media, tmp_path):
    """The browser path with the end-of-turn predictor (what `run.py serve` uses by default):
    the predictor ends the turn at its short pause, so the page reports an end-of-turn wait
    below the fixed silence the old rule always waited (and says what ended the turn)."""
    from playwright.sync_api import sync_playwright
    from app.engine import DEFAULT_TURN_END_MODEL, EngineOptions
    from speech.constants import END_OF_TURN_SILENCE, TURN_END_PAUSE
    wav, y4m = media
    opts = EngineOptions(turn_end_model=str(DEFAULT_TURN_END_MODEL))
    with ServerThread(random_agent("tiny"), ServerOptions(port=0, engine=opts)) as server, \
            sync_playwright() as pw:
        browser = launch(pw, tmp_path / "profile", wav, y4m)
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.click("#start")
            stats = first_turn(page)
            page.wait_for_timeout(500)
            ended = page.locator("#turns tr").first.locator('[data-k="ended"]').text_content()
        finally:
            browser.close()
    assert ended.startswith("predictor"), ended
    assert TURN_END_PAUSE - 0.05 <= stats["lastWait"] < END_OF_TURN_SILENCE, stats
    assert stats["lastResponseLatency"] > stats["lastWait"]


def test_browser_token_flow(media, tmp_path):
    """A server started with a token: the page shows the server's error and a token field;
    with the token it goes live."""
    from playwright.sync_api import sync_playwright
    wav, y4m = media
    with ServerThread(random_agent("tiny"), ServerOptions(port=0, token="s3cret")) as server, \
            sync_playwright() as pw:
        browser = launch(pw, tmp_path / "profile", wav, y4m)
        try:
            page = browser.new_page()
            page.goto(server.url)
            assert page.locator("#token").is_hidden()
            page.click("#start")
            page.wait_for_function("window.tandemStats.errors.length > 0", timeout=20_000)
            assert page.locator("#token").is_visible()
            assert "unauthorized" in page.text_content("#errors")
            assert page.text_content("#status") in ("unauthorized", "closed: unauthorized")
            page.fill("#token", "s3cret")
            page.click("#start")
            page.wait_for_function("window.tandemStats.state === 'live'", timeout=20_000)
            page.wait_for_function("window.tandemStats.audioBytesSent > 16000", timeout=20_000)
            assert page.evaluate("window.tandemStats.session")
        finally:
            browser.close()


def test_browser_demo_scene_with_the_shipped_model(tmp_path):
    """"Demo scene": the server renders a seeded demo-world scene as the agent's camera and
    scene sound; the page shows its frames, plays its beeps and lists example questions; the
    (fake) microphone asks an audio-visual question valid for that scene and the shipped model
    answers it right."""
    from playwright.sync_api import sync_playwright

    from app.agent import DEFAULT_MODEL, load_agent
    from app.demo_scene import DemoScene, DemoSceneOptions
    from demo import world as W
    from speech.tts import Voice, synthesize_cached
    from demo.replies import answer_right
    seed = 1
    shown = DemoScene(DemoSceneOptions(seed=seed, scene_seconds=0)).shown(0.0)
    (q,) = W.candidate_questions(shown.scene, "which_object")   # needs the beeps and the picture
    x = synthesize_cached(q.text, Voice("en-us", None, 160, 50)).astype(np.float64)
    x *= 10 ** (-22 / 20) / np.sqrt(np.mean(x * x))              # -22 dBFS RMS, as the world speaks
    z = lambda s: np.zeros(int(s * SAMPLE_RATE))  # noqa: E731
    wav = tmp_path / "mic.wav"                    # the beeps come 1 s into the scene, then the question
    sf.write(wav, resample(np.concatenate([z(3.0), x, z(6.0)]).astype(np.float32), SAMPLE_RATE, 48000),
             48000, subtype="PCM_16")
    y4m = write_y4m(tmp_path / "camera.y4m", n=4)                 # unused: the scene is the camera
    problems: list[str] = []
    with ServerThread(load_agent(DEFAULT_MODEL), ServerOptions(port=0)) as server, sync_playwright() as pw:
        browser = launch(pw, tmp_path / "profile", wav, y4m)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(server.url + f"?source=demo&seed={seed}&timer=0")
            assert page.locator("#new-scene").is_visible() and page.input_value("#source") == "demo"
            page.click("#start")
            page.wait_for_function("window.tandemStats.turns >= 1", timeout=180_000)
            stats = page.evaluate("window.tandemStats")
            examples = page.locator("#scene-examples li").all_text_contents()
            desc = page.text_content("#scene-desc")
            shown_img = page.locator("#scene-view").is_visible()
            video_hidden = page.locator("#preview").is_hidden()
            page.click("#new-scene")                              # another scene, announced
            page.wait_for_function("window.tandemStats.scenes >= 2", timeout=30_000)
            second = page.evaluate("window.tandemStats.scene")
        finally:
            browser.close()
    assert not stats["errors"] and not problems, (stats["errors"], problems)
    assert stats["source"] == "demo" and stats["framesSent"] == 0      # no camera frames
    assert stats["scene"]["index"] == 0 and stats["scene"]["description"] == shown.description
    assert desc.lower() == shown.description.lower() and examples == [e.text for e in shown.examples]
    assert shown_img and video_hidden and stats["sceneFrames"] >= 20
    assert stats["beeps"] >= len(shown.scene.beeps) >= 1                 # the page played them
    assert answer_right(stats["lastReply"], q.answer, q.qtype), (q, stats["lastReply"])   # slot rule
    assert second["index"] == 1 and second["description"] != shown.description
