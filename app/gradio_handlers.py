"""The Gradio app's handlers: one `LiveController` per app holds the active conversation
(local devices, browser devices or a demo replay) and turns its state into what the page
shows. What the agent sees is the camera or the demo-world scene (app.demo_scene), which
the page shows and plays. Plain Python, so tests call the handlers directly;
`app.gradio_app` lays them out.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from demo.replies import reply_text

from .demo_scene import DemoScene, DemoSceneOptions, SoundCursor
from .live import LiveOptions, LiveSession, LiveSnapshot, LocalDevices

log = logging.getLogger("tandem.gradio")

ROOT = Path(__file__).resolve().parent.parent
RANDOM = "random (untrained)"
ALT_HINT = ("Use the **Browser devices** tab (your browser's webcam and microphone) or the "
            "**Demo replay** tab (a recorded session) instead.")
SCENE, CAMERA = "Demo-world scene", "Camera"
SOURCES = (SCENE, CAMERA)          # what the agent sees
NO_CAMERA_HINT = ("No camera here: the agent sees the **demo-world scene** (the world the "
                  "shipped model was trained on); ask it about the scene aloud.")


def find_checkpoints(assets: Path = ROOT / "assets") -> list[str]:
    """Fusion checkpoints shipped in `assets` (relative paths when under the repo)."""
    if not assets.is_dir():
        return []
    found = sorted(p for p in assets.rglob("*.safetensors")
                   if "codec" not in p.name and "sessions" not in p.parts)
    return [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in found]


class LiveController:
    """App-wide state (a desktop app: one conversation at a time). `audio_factory(agent)`
    returns a (source, sink) pair to use instead of the sound card (tests, headless demos);
    `agents` preloads agents by model choice (e.g. {RANDOM: agent})."""

    def __init__(self, options: LiveOptions = LiveOptions(), *, model: str | None = None,
                 device: str | None = None, random_preset: str = "demo",
                 audio_factory=None, sessions_dir: Path = ROOT / "assets" / "sessions",
                 notices: list[str] | None = None, agents: dict | None = None,
                 scene_options: DemoSceneOptions = DemoSceneOptions(),
                 webcam_mirrored: bool = True):
        self.options, self.device, self.random_preset = options, device, random_preset
        self.scene_options = scene_options
        self.webcam_mirrored = webcam_mirrored     # the browser sends mirrored webcam frames
        self.audio_factory, self.sessions_dir = audio_factory, Path(sessions_dir)
        self.models = find_checkpoints() + [RANDOM]
        self.default_model = model or self.models[0]
        if self.default_model not in self.models:
            self.models.insert(0, self.default_model)
        self.device_notices = list(notices or [])
        no_camera = options.camera is None or any(n.startswith("No camera") for n in
                                                  self.device_notices)
        self.default_source = SCENE if no_camera else CAMERA
        self._stopped_by_user = False   # Stop pressed: stray browser input is expected
        self.session: LiveSession | None = None
        self.kind = ""                  # "local" | "browser" | "demo"
        self._agents: dict[str, object] = dict(agents or {})   # loaded agents by model choice
        self._lock = threading.Lock()
        self._message = ""              # the last start/stop outcome, shown under the buttons

    # --- agents and sessions ------------------------------------------------------------
    def agent(self, model: str):
        if model not in self._agents:
            from .agent import load_agent, random_agent
            path = Path(model)
            if not path.is_absolute() and not path.exists():
                path = ROOT / path                     # checkpoints are listed repo-relative
            self._agents[model] = (random_agent(self.random_preset, device=self.device)
                                   if model == RANDOM else load_agent(path, self.device))
        return self._agents[model]

    def _replace(self, session: LiveSession | None, kind: str) -> None:
        with self._lock:
            old, self.session, self.kind = self.session, session, kind
        if old is not None:
            old.stop()

    def _scene(self, source: str | None, every: float | None) -> DemoScene | None:
        """The demo scene for `source` (None: the page's default), a new one each start;
        `every`: new scene every this many s (0: only on the button)."""
        source = source or self.default_source
        if source not in SOURCES:
            raise ValueError(f"the agent sees one of {SOURCES}, got {source!r}")
        if source != SCENE:
            return None
        o = self.scene_options
        return DemoScene(o if every is None else replace(o, scene_seconds=float(every)))

    def start_local(self, model: str, mode: str, source: str | None = None,
                    every: float | None = None) -> str:
        """Start a conversation on this machine's sound card and its camera or the demo
        scene (`source`, see `_scene`)."""
        from speech.io import AudioDeviceError
        from vision.camera import CameraError
        self._replace(None, "")
        try:
            scene = self._scene(source, every)
            agent = self.agent(model)
            opts = replace(self.options, mode=mode)
            if scene is not None:
                opts = replace(opts, camera=None)
            if self.audio_factory is not None:
                src, sink = self.audio_factory(agent)
                live = LocalDevices(agent, opts, source=src, sink=sink, scene=scene)
            else:
                live = LocalDevices(agent, opts, scene=scene)
            live.start()
        except (AudioDeviceError, CameraError) as e:
            self._message = f"⚠ Cannot start on this machine's devices: {e}\n\n{ALT_HINT}"
            return self._message
        except (FileNotFoundError, ValueError) as e:
            self._message = f"⚠ {e}"
            return self._message
        self._replace(live, "local")
        sees = "the demo-world scene" if scene is not None else "the camera"
        self._message = (f"▶ Live on this machine's microphone and speaker, seeing {sees} "
                         f"({agent.name}, {mode}). Ask your question aloud.")
        return self._message

    def start_browser(self, model: str, mode: str, source: str | None = None,
                      every: float | None = None) -> str:
        """Start a session fed by the browser's microphone (and webcam, when the agent sees
        the camera); the message says what to click next."""
        from .live_inputs import BrowserDevices
        self._replace(None, "")
        try:
            scene = self._scene(source, every)
            agent = self.agent(model)
        except (FileNotFoundError, ValueError) as e:
            self._message = f"⚠ {e}"
            return self._message
        self._replace(BrowserDevices(agent, replace(self.options, mode=mode), scene=scene),
                      "browser")
        steps = ("the microphone starts (allow it if your browser asks); if it does not, "
                 "click **Record** under *Microphone*. Then ask about the scene aloud."
                 if scene is not None else
                 "the webcam and the microphone start (allow them if your browser asks); if "
                 "they do not, click **Click to Access Webcam** and **Record** under "
                 "*Webcam*, and **Record** under *Microphone*. Then ask aloud.")
        self._message = f"▶ Browser session started ({agent.name}, {mode}): {steps}"
        return self._message

    def demo_sessions(self) -> list[str]:
        from .live_inputs import demo_sessions
        return [str(p) for p in demo_sessions(self.sessions_dir)]

    def start_demo(self, session_dir: str | None, model: str, mode: str) -> str:
        from .live_inputs import demo_replay
        from .session import SessionError
        if not session_dir:
            self._message = f"⚠ No recorded session in {self.sessions_dir}."
            return self._message
        self._replace(None, "")
        try:
            agent = self.agent(model)
            sink = self.audio_factory(agent)[1] if self.audio_factory is not None else None
            live = demo_replay(agent, Path(session_dir), replace(self.options, mode=mode),
                               sink=sink)
            live.start()
        except (SessionError, FileNotFoundError, ValueError) as e:
            self._message = f"⚠ {e}"
            return self._message
        self._replace(live, "demo")
        self._message = f"▶ Replaying {Path(session_dir).name} at real time ({agent.name}, {mode})."
        return self._message

    def stop(self) -> str:
        self._replace(None, "")
        self._stopped_by_user = True
        self._message = "■ Stopped."
        return self._message

    def page_loaded(self) -> tuple:
        """A (re)loaded page starts clean: the old conversation ends, nothing stale shows."""
        self._replace(None, "")
        self._stopped_by_user, self._message = False, ""
        return self.refresh()

    # --- the demo scene ----------------------------------------------------------------------
    def new_scene(self) -> str:
        """The button: a new scene from now (when the agent sees the demo scene)."""
        s = self.session
        if s is None or s.scene is None:
            return self.scene_markdown()
        s.scene.new_scene(s.clock)
        return self.scene_markdown()

    def scene_markdown(self) -> str:
        """The scene on screen: what is in it and questions to ask about it."""
        s = self.session
        if s is None or s.scene is None:
            return ("*Start a conversation with “The agent sees: Demo-world scene” to get a "
                    "scene to talk about.*")
        shown = s.scene.shown(s.clock)
        every = s.scene.options.scene_seconds
        timer = f"a new one every {every:.0f} s" if every else "new ones on the button"
        version = s.scene.options.version
        qs = "\n".join(f"- “{q.text}” — expect *{reply_text(q.qtype, q.text, q.answer, version)}*"
                       for q in shown.examples)
        return (f"**Scene {shown.index + 1}** ({timer}): {shown.description}\n\n"
                f"Try asking:\n{qs}")

    def scene_sound(self, chunk_seconds: float = 0.25):
        """Generator for a streaming gr.Audio output: WAV bytes of the demo scene's sound
        (its beeps) at the session clock, while a local scene session runs."""
        from .live_inputs import wav_bytes
        from speech.audio import float_to_pcm16
        s = self.session
        if s is None or s.scene is None or self.kind != "local":
            return
        cursor, sr = SoundCursor(s.scene, s.scene.options.sample_rate), \
            s.scene.options.sample_rate
        n, due = int(round(chunk_seconds * sr)), time.monotonic()
        while self.session is s and s.running:
            due += chunk_seconds
            time.sleep(max(0.0, due - time.monotonic()))
            yield wav_bytes(sr, float_to_pcm16(cursor.next(n, s.clock)))

    # --- browser streams ---------------------------------------------------------------
    def browser_mic(self, chunk) -> None:
        """A microphone chunk (sr, int16 PCM) from the browser's streaming gr.Audio."""
        from .live_inputs import BrowserDevices
        s = self.session
        if chunk is None:
            return
        if not isinstance(s, BrowserDevices) or not s.running:
            self._message = ("■ Stopped. Your browser still records the microphone: click "
                             "its stop button." if self._stopped_by_user else
                             "⚠ Your microphone is streaming but no browser session is "
                             "running: click **▶ Start browser session**.")
            return
        sr, pcm = chunk
        if pcm is not None and len(pcm):
            s.push_mic(int(sr), np.asarray(pcm))

    def browser_voice(self, chunk_seconds: float = 0.25):
        """Generator for a streaming gr.Audio output: WAV bytes of the agent's voice, one
        `chunk_seconds` chunk per `chunk_seconds` of wall time (silence between replies),
        until the browser session ends."""
        from .live_inputs import BrowserDevices, wav_bytes
        s = self.session
        if not isinstance(s, BrowserDevices):
            return
        due = time.monotonic()
        while self.session is s and s.running:
            due += chunk_seconds
            time.sleep(max(0.0, due - time.monotonic()))
            yield wav_bytes(*s.pull_reply(chunk_seconds))

    def browser_frame(self, rgb) -> None:
        """A webcam frame from the browser's streaming gr.Image: RGB, mirrored like the
        preview when `webcam_mirrored` (Gradio draws it flipped): the agent gets it as
        the camera saw it, so what is on the user's right is on the image's left."""
        from .live_inputs import BrowserDevices
        s = self.session
        if rgb is not None and isinstance(s, BrowserDevices):
            x = np.asarray(rgb)
            s.push_frame(x[:, ::-1] if self.webcam_mirrored else x)

    # --- what the page shows ---------------------------------------------------------------
    def snapshot(self) -> LiveSnapshot | None:
        s = self.session
        return None if s is None else s.snapshot()

    def notices_markdown(self, snap: LiveSnapshot | None = None) -> str:
        notes = list(self.device_notices) + (list(snap.notices) if snap else [])
        if not notes:
            return ""
        lines = "\n".join(f"- {n}" for n in notes)
        hint = ""
        if self.device_notices:
            hint = "\n\n" + (NO_CAMERA_HINT + " " if self.default_source == SCENE else "") \
                + ALT_HINT
        return f"### ⚠ Notes\n{lines}{hint}"

    def status_markdown(self, snap: LiveSnapshot | None) -> str:
        if snap is None:
            return f"**Status:** not running. {self._message}"
        m = snap.metrics[-1] if snap.metrics else None
        last = "" if m is None or m.response_latency is None else (
            f" · last response latency **{m.response_latency * 1000:.0f} ms**")
        err = f"\n\n❌ {snap.error}" if snap.error else ""
        msg = "■ Finished: the replay ended." if snap.status == "finished" else self._message
        return (f"**Status:** {snap.status} ({self.kind}) · session clock {snap.clock:.1f} s · "
                f"turns: {len(snap.metrics)}{last}\n\n{msg}{err}")

    @staticmethod
    def chat_messages(snap: LiveSnapshot | None) -> list[dict]:
        if snap is None:
            return []
        role = {"user": "user", "assistant": "assistant", "system": "assistant"}
        return [{"role": role[t.role], "content": f"*{t.text}*" if t.role == "system" else t.text}
                for t in snap.transcript]

    @staticmethod
    def latency_frame(snap: LiveSnapshot | None):
        """Per turn: response and compute latency in ms (long format for gr.LinePlot)."""
        import pandas as pd
        rows = []
        for m in (snap.metrics if snap else ()):
            for name, v in (("response", m.response_latency), ("compute", m.compute_latency)):
                if v is not None:
                    rows.append({"turn": m.turn, "latency_ms": 1000.0 * v, "kind": name})
        return pd.DataFrame(rows, columns=["turn", "latency_ms", "kind"]).astype(
            {"turn": "int64", "latency_ms": "float64", "kind": "string"})  # typed even if empty

    @staticmethod
    def attention_frame(snap: LiveSnapshot | None):
        """The last turn's aggregator attention per context time, split into video/audio."""
        import pandas as pd
        from .live_inputs import attention_series
        rows = [{"t": t, "weight": w, "modality": k}
                for k, t, w in attention_series(snap.attention if snap else None)]
        return pd.DataFrame(rows, columns=["t", "weight", "modality"]).astype(
            {"t": "float64", "weight": "float64", "modality": "string"})

    def preview_frame(self) -> tuple[object, np.ndarray | None]:
        """(key, RGB picture of what the agent sees); the key changes with the picture."""
        s = self.session
        if s is None:
            return None, None
        snap = s.snapshot()
        return (id(s), s.preview_id), snap.preview

    def reply_audio(self, snap: LiveSnapshot | None):
        """The demo replay's reply audio when there is no speaker to play it, else None."""
        from speech.io import MemorySink
        s = self.session
        sink = getattr(s, "sink", None)
        if self.kind != "demo" or not isinstance(sink, MemorySink) or not len(sink.audio):
            return None
        return sink.sample_rate, sink.audio.copy()

    def refresh(self) -> tuple:
        """(status, notices, preview, chat, latency frame, attention frame) for the timer."""
        snap = self.snapshot()
        return (self.status_markdown(snap), self.notices_markdown(snap),
                None if snap is None else snap.preview, self.chat_messages(snap),
                self.latency_frame(snap), self.attention_frame(snap))
