"""The Gradio app's handlers: one `LiveController` per app holds the active conversation
(local devices, browser devices or a demo replay) and turns its state into what the page
shows. Plain Python, so tests call the handlers directly; `app.gradio_app` lays them out.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .live import LiveOptions, LiveSession, LiveSnapshot, LocalDevices

log = logging.getLogger("tandem.gradio")

ROOT = Path(__file__).resolve().parent.parent
RANDOM = "random (untrained)"
ALT_HINT = ("Use the **Browser devices** tab (your browser's webcam and microphone) or the "
            "**Demo replay** tab (a recorded session) instead.")


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
                 notices: list[str] | None = None, agents: dict | None = None):
        self.options, self.device, self.random_preset = options, device, random_preset
        self.audio_factory, self.sessions_dir = audio_factory, Path(sessions_dir)
        self.models = find_checkpoints() + [RANDOM]
        self.default_model = model or self.models[0]
        if self.default_model not in self.models:
            self.models.insert(0, self.default_model)
        self.device_notices = list(notices or [])
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

    def start_local(self, model: str, mode: str) -> str:
        """Start a conversation on this machine's camera and sound card."""
        from speech.io import AudioDeviceError
        from vision.camera import CameraError
        self._replace(None, "")
        try:
            agent = self.agent(model)
            opts = replace(self.options, mode=mode)
            if self.audio_factory is not None:
                src, sink = self.audio_factory(agent)
                live = LocalDevices(agent, opts, source=src, sink=sink)
            else:
                live = LocalDevices(agent, opts)
            live.start()
        except (AudioDeviceError, CameraError) as e:
            self._message = f"⚠ Cannot start on this machine's devices: {e}\n\n{ALT_HINT}"
            return self._message
        except (FileNotFoundError, ValueError) as e:
            self._message = f"⚠ {e}"
            return self._message
        self._replace(live, "local")
        self._message = f"▶ Live on this machine's devices ({agent.name}, {mode})."
        return self._message

    def start_browser(self, model: str, mode: str) -> str:
        from .live_inputs import BrowserDevices
        try:
            agent = self.agent(model)
        except (FileNotFoundError, ValueError) as e:
            self._message = f"⚠ {e}"
            return self._message
        self._replace(BrowserDevices(agent, replace(self.options, mode=mode)), "browser")
        self._message = (f"▶ Browser devices ready ({agent.name}, {mode}): start the webcam "
                         "and the microphone below.")
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
            live = demo_replay(agent, Path(session_dir), replace(self.options, mode=mode), sink=sink)
            live.start()
        except (SessionError, FileNotFoundError, ValueError) as e:
            self._message = f"⚠ {e}"
            return self._message
        self._replace(live, "demo")
        self._message = f"▶ Replaying {Path(session_dir).name} at real time ({agent.name}, {mode})."
        return self._message

    def stop(self) -> str:
        self._replace(None, "")
        self._message = "■ Stopped."
        return self._message

    # --- browser streams ---------------------------------------------------------------
    def browser_mic(self, chunk) -> None:
        """A microphone chunk (sr, int16 PCM) from the browser's streaming gr.Audio."""
        from .live_inputs import BrowserDevices
        s = self.session
        if chunk is None or not isinstance(s, BrowserDevices) or not s.running:
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
        from .live_inputs import BrowserDevices
        s = self.session
        if rgb is not None and isinstance(s, BrowserDevices):
            s.push_frame(np.asarray(rgb))

    # --- what the page shows ---------------------------------------------------------------
    def snapshot(self) -> LiveSnapshot | None:
        s = self.session
        return None if s is None else s.snapshot()

    def notices_markdown(self, snap: LiveSnapshot | None = None) -> str:
        notes = list(self.device_notices) + (list(snap.notices) if snap else [])
        if not notes:
            return ""
        lines = "\n".join(f"- {n}" for n in notes)
        hint = f"\n\n{ALT_HINT}" if self.device_notices else ""
        return f"### ⚠ Notes\n{lines}{hint}"

    def status_markdown(self, snap: LiveSnapshot | None) -> str:
        if snap is None:
            return f"**Status:** not running. {self._message}"
        m = snap.metrics[-1] if snap.metrics else None
        last = "" if m is None or m.response_latency is None else (
            f" · last response latency **{m.response_latency * 1000:.0f} ms**")
        err = f"\n\n❌ {snap.error}" if snap.error else ""
        return (f"**Status:** {snap.status} ({self.kind}) · session clock {snap.clock:.1f} s · "
                f"turns: {len(snap.metrics)}{last}\n\n{self._message}{err}")

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
