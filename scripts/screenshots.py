"""Retakes the README screenshots with the shipped model (dev tool, needs `make setup-dev`):

    .venv/bin/python scripts/screenshots.py [--only browser|gradio]

docs/browser_client.png: `run.py serve`'s page in headless Chromium on its "Demo scene" (the
server renders the demo world), a WAV file as the fake microphone asking two of the shown
scene's example questions (espeak-ng); docs/gradio_app.png: the Gradio app in
its demo-world scene mode ("This computer"), a WAV file standing in for the microphone
asking two of the shown scene's example questions (espeak-ng)."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def browser_client(agent, wav: Path, y4m: Path, out_png: Path, tmp: Path, turns: int,
                   query: str = "") -> None:
    from playwright.sync_api import sync_playwright
    from app.server import ServerOptions, ServerThread
    from tests.test_browser import launch
    with ServerThread(agent, ServerOptions(port=0)) as server, sync_playwright() as pw:
        browser = launch(pw, tmp / "profile", wav, y4m)
        page = browser.new_page()
        page.goto(server.url + query)
        page.click("#start")
        deadline = time.monotonic() + 120
        while page.evaluate("window.tandemStats")["turns"] < turns and time.monotonic() < deadline:
            time.sleep(0.5)
        page.wait_for_timeout(2500)
        page.screenshot(path=str(out_png), full_page=True)
        browser.close()


SCENE_SEED = 4                 # the demo scene shown (its first scene beeps)


def scene_questions(seed: int, tmp: Path) -> Path:
    """Two of the first scene's example questions (one heard, one seen), spoken at 2.5 s
    and 11 s of a 16 s 48 kHz WAV (Chromium loops it; the scene beeps at 1 s and 9 s)."""
    import numpy as np
    import soundfile as sf
    from app.demo_scene import DemoScene, DemoSceneOptions
    from speech.audio import resample
    from speech.constants import SAMPLE_RATE
    from speech.tts import Voice, synthesize
    examples = DemoScene(DemoSceneOptions(seed=seed)).shown(0.0).examples
    x = np.zeros(16 * SAMPLE_RATE, np.float32)
    for q, t in zip(examples[:2], (2.5, 11.0)):
        speech = synthesize(q.text, Voice("en-us", None, 160, 50), SAMPLE_RATE)
        speech = speech * (10 ** (-24 / 20) / np.sqrt(np.mean(speech ** 2)))
        a = int(t * SAMPLE_RATE)
        x[a:a + len(speech)] = speech
    wav = tmp / "questions.wav"
    sf.write(wav, resample(x, SAMPLE_RATE, 48_000), 48_000, subtype="PCM_16")
    return wav


def gradio_app(out_png: Path, tmp: Path, turns: int) -> None:
    """The app in demo-scene mode on "This computer", a WAV file as the microphone (no
    sound card here: the replies go to a MemorySink) asking about the scene."""
    from playwright.sync_api import sync_playwright
    from app.demo_scene import DemoSceneOptions
    from app.gradio_app import launch
    from app.gradio_handlers import LiveController
    from app.live import LiveOptions
    from speech.io import FileSource, MemorySink
    wav = scene_questions(SCENE_SEED, tmp)

    def file_mic(agent):
        return FileSource(wav, realtime=True), MemorySink(agent.output_rate, clock=time.monotonic)
    ctl = LiveController(LiveOptions(camera=None), audio_factory=file_mic,
                         scene_options=DemoSceneOptions(seed=SCENE_SEED, scene_seconds=0))
    demo, url = launch(ctl, "127.0.0.1", 7861, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                         args=["--headless=new", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("button", name="▶ Start", exact=True).click()
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                snap = ctl.snapshot()
                if snap is not None and len(snap.metrics) >= turns and all(
                        not t.text.startswith("speech,") for t in snap.transcript):
                    break                    # the replies and the user's words are in
                time.sleep(0.5)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out_png), full_page=True)
            browser.close()
    finally:
        ctl.stop()
        demo.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "docs"))
    p.add_argument("--only", choices=("browser", "gradio"), default=None,
                   help="retake only docs/browser_client.png or only docs/gradio_app.png")
    a = p.parse_args()
    from app.agent import load_agent
    out = Path(a.out)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if a.only in (None, "browser"):
            from tests.test_browser import write_y4m
            wav, y4m = scene_questions(SCENE_SEED, tmp), write_y4m(tmp / "camera.y4m", n=4)
            browser_client(load_agent(), wav, y4m, out / "browser_client.png", tmp, turns=2,
                           query=f"?source=demo&seed={SCENE_SEED}&timer=0")
            print(f"wrote {out / 'browser_client.png'}")
        if a.only in (None, "gradio"):
            gradio_app(out / "gradio_app.png", tmp, turns=2)
            print(f"wrote {out / 'gradio_app.png'}")


if __name__ == "__main__":
    main()
