"""The browser page's demo world: what the shipped model knows (GET /info) and the live demo
scene of a websocket session (app/demo_scene.py as the agent's camera and scene sound).

In a demo-scene session (the handshake's "demo_scene", app/protocol.py) the server renders
the scene on the session clock (input audio received): every frame goes to the engine and,
as a JPEG (kind 6, video out), to the page; the scene's beeps are mixed into what the agent
hears and announced to the page ("scene_beep" events, ahead of time) so it plays them; each
scene shown is announced ("scene": description, example questions, when the next one comes).
"""
from __future__ import annotations

import numpy as np

from demo import world as W
from speech.constants import CONTEXT_SECONDS, SAMPLE_RATE

from . import protocol as P
from .demo_scene import DemoScene, DemoSceneOptions
from .frames import LATENCY_WORDS, Control

BEEP_LOOKAHEAD = 0.6      # s: beeps are announced this far ahead of the session clock
JPEG_QUALITY = 85
PLACEHOLDERS = {"c": "colour", "s": "shape", "p": "left/middle/right"}


def page_info(model: str) -> dict:
    """GET /info: the model's name, what it knows (the demo world, a few lines), the questions
    it understands (demo.world.QTYPES, so the page stays in step with the world) and the
    latency words (app.frames.LATENCY_WORDS)."""
    shapes = ", ".join(f"{x}s" for x in W.SHAPES[:-1]) + f" or {W.SHAPES[-1]}s"
    colors = ", ".join(W.COLORS) .rsplit(", ", 1)
    world = [
        f"The shipped model knows only the demo world: up to {len(W.SLOTS)} shapes ({shapes}; "
        f"{colors[0]} or {colors[1]}) in the {', '.join(W.SLOTS[:-1])} and {W.SLOTS[-1]} slots of a "
        "dark picture, and beeps, high or low, that one of the shapes makes while it pulses.",
        f"It answers a spoken question about the last {CONTEXT_SECONDS:.0f} s it saw and heard, in a "
        "word or two. Your room or your face are outside what it learnt: pick \u201cDemo scene\u201d "
        "to show it its world.",
    ]
    groups: dict[str, list[str]] = {}
    for group, template, _ in W.QTYPES.values():
        groups.setdefault(group, []).append(template.format(**PLACEHOLDERS))
    return {"model": model, "world": world,
            "questions": [{"group": g, "questions": qs} for g, qs in groups.items()],
            "latency": {k: {"name": name, "text": text} for k, (name, text) in LATENCY_WORDS.items()}}


class SceneFeed:
    """One session's demo scene, standing in front of its engine on the session's worker
    thread: `push_audio` mixes in the scene sound, pushes it and the due frames to the engine
    and hands the page's messages (bytes) to `send`; camera frames are ignored (the scene is
    the camera); a "new_scene" control shows another scene, other frames go to the engine."""

    def __init__(self, engine, options: DemoSceneOptions, send):
        self.engine, self.scene, self.send = engine, DemoScene(options), send
        self.fed = 0                          # 16 kHz samples pushed
        self._frame = None                    # index of the last frame pushed
        self._shown = None                    # index of the last scene announced
        self._beeps: set[float] = set()       # t0 of the beeps announced

    @property
    def now(self) -> float:
        return self.engine.now

    def push_audio(self, pcm: np.ndarray) -> None:
        i0 = self.fed
        self.fed += len(pcm)
        self.engine.push_audio(self.scene.hear(i0, pcm))
        self._send_due()

    def push_frame(self, image, t=None) -> None:
        """A camera frame: not this session's picture."""

    def push(self, frame) -> None:
        if isinstance(frame, Control) and frame.kind in P.SCENE_ACTIONS:
            self.scene.new_scene(self.fed / SAMPLE_RATE)
            self._send_due()
        else:
            self.engine.push(frame)

    def _send_due(self) -> None:
        for message in self.messages():
            self.send(message)

    def messages(self) -> list[bytes]:
        """The page's share of what is due at the session clock: the scene (when it changed),
        the frame (when a new one is due; also pushed to the engine), beeps ahead."""
        import cv2
        t, out = self.fed / SAMPLE_RATE, []
        shown = self.scene.shown(t)
        if shown.index != self._shown:
            self._shown = shown.index
            every = self.scene.options.scene_seconds
            out.append(P.event("scene", t=round(t, 4), index=shown.index,
                               description=shown.description,
                               examples=[q.text for q in shown.examples],
                               next_at=round(shown.start + every, 4) if every else None))
            self._frame = None                # show the new scene at once
        k = round(self.scene.frame_time(t) * self.scene.options.fps)
        if k != self._frame:
            self._frame = k
            img = self.scene.frame(t)
            self.engine.push_frame(img)
            ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            assert ok, img.shape
            out.append(P.encode(P.Kind.VIDEO_OUT, jpeg.tobytes()))
        for b in self.scene.beeps(t, t + BEEP_LOOKAHEAD):
            if b.t0 >= t - 0.05 and b.t0 not in self._beeps:
                self._beeps.add(b.t0)
                out.append(P.event("scene_beep", t=round(t, 4), t0=b.t0, dur=b.dur,
                                   freq=b.freq, level_dbfs=b.level_dbfs))
        if len(self._beeps) > 256:
            self._beeps = {x for x in self._beeps if x > t - 5}
        return out
