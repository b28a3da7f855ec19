"""The demo world as a live scene: what the shipped model knows, rendered on a clock, so a
person can talk to the agent about it with their own microphone.

`DemoScene` is a pure function of time (session seconds) plus the requests made of it:
- `frame(t)`: the camera frame at t, at the camera rate (`DemoSceneOptions.fps`), BGR;
- `audio(i0, n)`: the scene's sound (its beeps) for samples [i0, i0 + n) at 16 kHz, for
  the user's speaker and for mixing into what the agent hears (`hear`);
- `new_scene(t)`: a new scene from t (a button); a timer makes one every `scene_seconds`;
- `shown(t)`: the scene on screen at t: its description and example questions whose
  answers are defined for it (demo.world.candidate_questions).
A scene's beeps (and the pulses of the object making them) start `beeps_after` s after it
appears and repeat every `beeps_every` s: the model listens to the 6 s before a question
ends, so a user asks right after hearing them (never two runs in those 6 s). Front-end
free: the Gradio app and the websocket server both drive it (`SoundCursor` plays the sound
on a speaker with its own pace).
"""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from demo import world as W
from speech.constants import CONTEXT_SECONDS, DEMO_FRAME_SIZE, DEMO_WORLD_FPS, SAMPLE_RATE

RUN_SECONDS = 3 * W.BEEP_DUR[1] + 2 * W.BEEP_GAP[1]   # the longest beep run: 1.6 s
MIN_BEEPS_EVERY = CONTEXT_SECONDS + RUN_SECONDS + 0.1  # no 6 s window hears two runs
KEPT_SCENES = 8                                        # past scenes kept for late readers


@dataclass(frozen=True)
class DemoSceneOptions:
    """fps: camera rate of the rendered frames. scene_seconds: a new scene this often
    (0: only on request). beeps_after: s from a scene's appearance to its beeps;
    beeps_every: they repeat this often (0: once). seed: None draws different scenes each
    run. split: the demo world's split rules for objects (train/val never show the
    test split's held-out colour-shape-slot triples)."""
    fps: float = DEMO_WORLD_FPS
    size: tuple[int, int] = DEMO_FRAME_SIZE          # (W, H)
    scene_seconds: float = 20.0
    beeps_after: float = 1.0
    beeps_every: float = 8.0
    sample_rate: int = SAMPLE_RATE
    split: str = "train"
    seed: int | None = None
    n_examples: int = 4
    version: str = "v2"              # the page's wording of the example questions and replies
                                     # (the shipped model's: demo.world.REPLY_VERSIONS)

    def __post_init__(self):
        if not 0 < self.fps <= 60:
            raise ValueError(f"fps must be within (0, 60], got {self.fps}")
        if len(self.size) != 2 or min(self.size) < 16:
            raise ValueError(f"size must be (width, height), each >= 16 px, got {self.size}")
        if not 0 <= self.beeps_after <= 10:
            raise ValueError(f"beeps_after must be within [0, 10] s, got {self.beeps_after}")
        if self.beeps_every and self.beeps_every < MIN_BEEPS_EVERY:
            raise ValueError(f"beeps_every must be 0 (beep once) or >= {MIN_BEEPS_EVERY:.1f} s "
                             f"(the model hears the {CONTEXT_SECONDS:.0f} s before a question "
                             f"ends; two runs of beeps in it have no single answer), got "
                             f"{self.beeps_every}")
        if self.scene_seconds and self.scene_seconds < self.beeps_after + RUN_SECONDS + 1:
            raise ValueError(f"scene_seconds must be 0 (new scenes on request only) or >= "
                             f"{self.beeps_after + RUN_SECONDS + 1:.1f} s (time to hear the "
                             f"beeps and ask), got {self.scene_seconds}")
        if self.sample_rate <= 0 or self.n_examples < 1:
            raise ValueError(f"sample_rate and n_examples must be positive, got "
                             f"{self.sample_rate} and {self.n_examples}")
        W.SplitRules(self.split, version=self.version)   # raises for an unknown split/version


@dataclass(frozen=True)
class ShownScene:
    """One scene as shown: from `start` (session s) until the next scene's start."""
    index: int                       # 0, 1, ... in the order shown
    start: float
    scene: W.Scene                   # events of its first beep cycle (absolute times)
    examples: tuple[W.Question, ...] = field(default=())

    @property
    def description(self) -> str:
        return W.describe_scene(self.scene)


class DemoScene:
    """Demo-world scenes on the session clock (thread-safe). Ask for times in any order;
    times before the oldest kept scene get that scene."""

    def __init__(self, options: DemoSceneOptions = DemoSceneOptions()):
        self.options = options
        self._rng = np.random.default_rng(options.seed)
        self._rules = W.SplitRules(options.split)
        self._lock = threading.Lock()
        self._shown: list[ShownScene] = []
        self._frame_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self._add(0.0)

    # --- which scene when ------------------------------------------------------------------
    def _add(self, t: float) -> ShownScene:
        o = self.options
        scene = W.sample_scene(self._rng, t + o.beeps_after, self._rules)
        examples = tuple(W.worded(q, o.version)
                         for q in W.example_questions(scene, o.n_examples, self._rng))
        index = self._shown[-1].index + 1 if self._shown else 0
        self._shown.append(ShownScene(index, round(t, 6), scene, examples))
        del self._shown[:-KEPT_SCENES]
        return self._shown[-1]

    def _advance(self, t: float) -> None:
        every = self.options.scene_seconds
        while every and t >= self._shown[-1].start + every:
            self._add(self._shown[-1].start + every)

    def new_scene(self, t: float) -> ShownScene:
        """Show a new scene from session time t (not before the current one's start)."""
        with self._lock:
            self._advance(t)
            return self._add(max(t, self._shown[-1].start))

    def shown(self, t: float) -> ShownScene:
        """The scene on screen at session time t."""
        with self._lock:
            self._advance(t)
            i = bisect.bisect_right([s.start for s in self._shown], t) - 1
            return self._shown[max(i, 0)]

    def _end(self, s: ShownScene) -> float:
        i = next(k for k, x in enumerate(self._shown) if x is s)
        return self._shown[i + 1].start if i + 1 < len(self._shown) else math.inf

    def _cycle(self, s: ShownScene, t: float) -> int:
        every = self.options.beeps_every
        if not every:
            return 0
        return max(0, math.floor((t - s.start - self.options.beeps_after) / every))

    def scene_at(self, t: float) -> W.Scene:
        """The scene at t with the events of its current beep cycle (what `frame` draws)."""
        s = self.shown(t)
        k = self._cycle(s, t)
        return W.shift_scene(s.scene, k * self.options.beeps_every) if k else s.scene

    # --- pictures and sound ----------------------------------------------------------------
    def frame_time(self, t: float) -> float:
        """The time of the camera frame on screen at t (frames come at `fps`)."""
        return math.floor(t * self.options.fps + 1e-9) / self.options.fps

    def frame(self, t: float) -> np.ndarray:
        """The camera frame at t: demo.world.render_frame of `scene_at` at `frame_time(t)`;
        (H, W, 3) uint8 BGR, read-only (shared between callers)."""
        tf = self.frame_time(t)
        s = self.shown(tf)
        key = (s.index, round(tf * self.options.fps))
        cached = self._frame_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        img = W.render_frame(self.scene_at(tf), tf, self.options.size)
        img.setflags(write=False)
        self._frame_cache = (key, img)
        return img

    def beeps(self, t0: float, t1: float) -> list[W.Beep]:
        """Every beep sounding within [t0, t1): a beep started before the next scene
        appears plays to its end."""
        o, out = self.options, []
        self.shown(t1)                               # the timer's scenes up to t1
        with self._lock:
            shown = list(self._shown)
            ends = [self._end(s) for s in shown]
        for s, end in zip(shown, ends):
            if end <= t0 - RUN_SECONDS or s.start >= t1:
                continue
            first = self._cycle(s, t0 - RUN_SECONDS)
            last = self._cycle(s, t1) if o.beeps_every else 0
            for k in range(first, last + 1):
                for b in s.scene.beeps:
                    b0 = b.t0 + k * o.beeps_every
                    if b0 < end and b0 < t1 and b0 + b.dur > t0:
                        out.append(W.Beep(b0, b.dur, b.freq, b.level_dbfs))
        return out

    def audio(self, i0: int, n: int, sample_rate: int | None = None) -> np.ndarray:
        """The scene's sound for samples [i0, i0 + n) of the session at `sample_rate`
        (default: options.sample_rate): float32 (n,), silence between beeps."""
        sr = sample_rate or self.options.sample_rate
        out = np.zeros(n, np.float32)
        for b in self.beeps(i0 / sr, (i0 + n) / sr):
            x = W.beep_wave(b, sr)
            a = int(round(b.t0 * sr)) - i0
            lo, hi = max(a, 0), min(a + len(x), n)
            if hi > lo:
                out[lo:hi] += x[lo - a:hi - a]
        return out

    def hear(self, i0: int, mic: np.ndarray) -> np.ndarray:
        """What the agent hears: microphone samples [i0, i0 + len(mic)) plus the scene's
        sound over the same samples (float32, clipped to [-1, 1])."""
        mic = np.asarray(mic, np.float32).reshape(-1)
        return np.clip(mic + self.audio(i0, len(mic)), -1.0, 1.0)


class SoundCursor:
    """The scene's sound for a speaker that plays at its own pace (a browser's player):
    `next(n, clock)` returns the next n samples, following the session `clock` (s) and
    jumping to it when playback drifts more than `resync` s away from it."""

    def __init__(self, scene: DemoScene, sample_rate: int, resync: float = 0.5):
        self.scene, self.sample_rate, self.resync = scene, int(sample_rate), resync
        self.pos = 0                                 # next sample, at sample_rate

    def next(self, n: int, clock: float) -> np.ndarray:
        target = int(round(clock * self.sample_rate))
        if abs(self.pos - target) > self.resync * self.sample_rate:
            self.pos = target
        out = self.scene.audio(self.pos, n, self.sample_rate)
        self.pos += n
        return out


def questions_markdown() -> str:
    """The questions the shipped model understands, from demo.world.QTYPES ({c} colour,
    {s} shape, {p} place), grouped by what they need."""
    names = {"c": "colour", "s": "shape", "p": "left/middle/right"}
    lines = []
    for group in ("visual", "audio", "audio-visual"):
        qs = [t.format(**{k: f"*{v}*" for k, v in names.items()})
              for g, t, _ in W.QTYPES.values() if g == group]
        lines.append(f"- **{group}**: " + " · ".join(qs))
    return "\n".join(lines)


def world_markdown() -> str:
    """A few lines on what the shipped model knows: the demo world."""
    colors, shapes = ", ".join(W.COLORS), ", ".join(W.SHAPES)
    return (f"The shipped model knows only the **demo world**: up to {len(W.SLOTS)} shapes "
            f"({shapes}; {colors}) in the left, middle and right slots of a dark picture, "
            f"and beeps (high or low) that one of the shapes makes while it pulses. It "
            f"answers questions about the last {CONTEXT_SECONDS:.0f} s it saw and heard:\n\n"
            + questions_markdown())
