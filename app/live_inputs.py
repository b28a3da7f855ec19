"""Other front ends of a live conversation, sharing `app.live.LiveSession`'s state, and helpers:

- `BrowserDevices`: the browser's webcam and microphone (Gradio streaming) feeding an
  Engine when the app runs on another machine; the reply is pulled back at playback pace
  (`PullSink`) into a streaming audio output.
- `demo_replay`: a recorded session (app/session.py) played through `LocalDevices` at real
  time: its mic.wav stands in for the microphone and its frames for the camera.
- `attention_series` (attention for a plot),
  `probe_devices` (what is missing on this machine).
"""
from __future__ import annotations

import bisect
import collections
import io
import threading
import time
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np

from speech.constants import SAMPLE_RATE
from speech.io import AudioSink
from speech.resample import StreamResampler

from .demo_scene import SoundCursor
from .live import LiveOptions, LiveSession, LiveSnapshot, LocalDevices

NO_FRAMES_AFTER = 3.0              # s of microphone audio without webcam frames: say so


class PullSink(AudioSink):
    """A speaker played by pulling: `pull(n)` returns the next n samples, silence where
    nothing is queued. Holds at most `max_seconds` (the oldest audio is dropped beyond)."""

    def __init__(self, sample_rate: int, max_seconds: float = 60.0):
        self.sample_rate = int(sample_rate)
        self._q: collections.deque[np.ndarray] = collections.deque()
        self._n, self._max = 0, int(max_seconds * self.sample_rate)
        self._lock = threading.Lock()
        self.played_samples = 0        # reply samples pulled (silence not counted)

    def write(self, pcm) -> None:
        x = np.asarray(pcm, np.float32).reshape(-1).copy()
        with self._lock:
            self._q.append(x)
            self._n += len(x)
            while self._n > self._max:             # drop the oldest samples
                extra, head = self._n - self._max, self._q[0]
                if len(head) <= extra:
                    self._q.popleft()
                    self._n -= len(head)
                else:
                    self._q[0] = head[extra:]
                    self._n -= extra

    def pull(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        got = 0
        with self._lock:
            while got < n and self._q:
                head = self._q[0]
                k = min(n - got, len(head))
                out[got:got + k] = head[:k]
                got += k
                if k == len(head):
                    self._q.popleft()
                else:
                    self._q[0] = head[k:]
            self._n -= got
            self.played_samples += got
        return out

    def queued_seconds(self) -> float:
        return self._n / self.sample_rate

    def clear(self) -> None:
        with self._lock:
            self._q.clear()
            self._n = 0


def _mic_float(pcm: np.ndarray) -> np.ndarray:
    """Gradio microphone data: int16 (T,) or (T, C), or float -> mono float32."""
    x = np.asarray(pcm)
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32)
    return x.mean(axis=1) if x.ndim == 2 else x.reshape(-1)


def wav_bytes(sample_rate: int, pcm16: np.ndarray) -> bytes:
    """A mono PCM16 WAV file in memory (what a streaming gr.Audio output takes)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(np.asarray(pcm16, "<i2").tobytes())
    return buf.getvalue()


class BrowserDevices(LiveSession):
    """Microphone chunks and webcam frames from a browser (any thread; pushes are
    serialised) into an Engine; the reply is pulled with `pull_reply` at playback pace.

    The session clock follows the wall clock: when the browser drops microphone audio
    (Gradio's streaming sends one chunk per round trip and drops what is recorded while it
    waits), a gap over `gap_fill_after` s is filled with silence, at most 3/4 of the
    end-of-turn silence per gap (a lost chunk must not end the user's turn; the clock lags
    by the rest from then on), and a notice says that audio is being lost."""

    def __init__(self, agent, options: LiveOptions = LiveOptions(), gap_fill_after: float = 0.15,
                 scene=None):
        super().__init__(agent, options, scene)
        self._push_lock = threading.Lock()
        self._rs: StreamResampler | None = None
        self._open_engine(PullSink(agent.output_rate))
        self._closed = False
        self.gap_fill_after = gap_fill_after
        self._max_fill = 0.75 * self.engine.options.shortest_turn_silence
        self._t0: float | None = None          # wall time the first chunk started
        self.received_seconds = self.filled_seconds = self._forgiven = 0.0
        self._last_frame: float | None = None  # wall time of the last webcam frame
        self._last_mic: float | None = None    # ... and microphone chunk
        self._scene_sound = None if scene is None else SoundCursor(scene, agent.output_rate)
        self.status = "listening"

    @property
    def running(self) -> bool:
        return not self._closed

    def push_mic(self, sample_rate: int, pcm: np.ndarray, now: float | None = None) -> None:
        """A microphone chunk (sr, int16 or float PCM, mono or (T, C)) received at wall time
        `now` (default: time.monotonic())."""
        if self._closed:
            raise RuntimeError("this browser session is closed; start a new one")
        x, sr = _mic_float(pcm), int(sample_rate)
        now = time.monotonic() if now is None else now
        with self._push_lock:
            if self._rs is None or self._rs.sr_in != sr:
                self._rs = StreamResampler(sr, SAMPLE_RATE)
            dur = len(x) / sr
            if self._t0 is None:
                self._t0 = now - dur
            gap = (now - self._t0) - (self.received_seconds + self.filled_seconds
                                      + self._forgiven + dur)
            if gap > self.gap_fill_after:      # audio the browser never sent: silence...
                fill = min(gap, self._max_fill)  # ...never enough to end the user's turn
                self.filled_seconds += fill
                self._forgiven += gap - fill     # the clock lags by this much from now on
                self._feed(np.zeros(int(round(fill * sr)), np.float32))
            self.received_seconds += dur
            self._last_mic = now
            self._feed(x)
            lost = self.filled_seconds / (self.filled_seconds + self.received_seconds)
        if self.filled_seconds > 1.0 and lost > 0.1:
            self.notice("The browser's microphone stream is losing audio (Gradio sends one "
                        "chunk per round trip and drops what arrives meanwhile; gaps become "
                        "silence). For lossless browser streaming use `python run.py serve`.")

    def _feed(self, x: np.ndarray) -> None:
        y = self._rs.feed(x)
        if y.size:
            self._feed_audio(y)

    def pull_reply(self, seconds: float) -> tuple[int, np.ndarray]:
        """The next `seconds` of the agent's voice: (rate, int16 PCM), silence between
        replies; with a demo scene, its sound mixed in (at the session clock)."""
        from speech.audio import float_to_pcm16
        sr = self.agent.output_rate
        n = int(round(seconds * sr))
        out = self.sink.pull(n)
        if self._scene_sound is not None:
            out = np.clip(out + self._scene_sound.next(n, self.clock), -1.0, 1.0)
        return sr, float_to_pcm16(out)

    def push_frame(self, rgb: np.ndarray, now: float | None = None) -> None:
        """One webcam frame, (H, W, 3) uint8 RGB (RGBA is cut to RGB), as the camera saw it
        (not mirrored). Ignored with a demo scene: the agent sees the scene."""
        if self._closed or self.scene is not None:
            return
        bgr = np.ascontiguousarray(np.asarray(rgb, np.uint8)[..., 2::-1])
        with self._push_lock:
            self.engine.push_frame(bgr)
            self._last_frame = time.monotonic() if now is None else now
        self.set_preview(bgr)

    def input_problems(self, now: float | None = None) -> list[str]:
        """What the user must fix now (cleared once fixed): microphone audio arriving
        without webcam frames (the agent would be blind)."""
        now = time.monotonic() if now is None else now
        if self.scene is not None or self._closed or self._t0 is None:
            return []
        since = now - (self._last_frame if self._last_frame is not None else self._t0)
        if since > NO_FRAMES_AFTER and self._last_mic is not None and \
                now - self._last_mic < NO_FRAMES_AFTER:
            return [f"No webcam frames for {since:.0f} s while your microphone streams: the "
                    f"agent sees nothing. Start the webcam (allow the camera, then its "
                    f"record button), or choose the demo-world scene."]
        return []

    def snapshot(self) -> LiveSnapshot:
        snap = super().snapshot()
        problems = tuple(self.input_problems())
        return replace(snap, notices=snap.notices + problems) if problems else snap

    def stop(self) -> None:
        self._closed = True
        self.engine.close()
        self.sink.clear()
        self._set_status("stopped")


class SessionCamera:
    """A recorded session's frames as a camera: `latest()` is the last frame due at the
    time since `start()` (decoded once, on demand)."""

    def __init__(self, session):
        self.session = session
        self._t0: float | None = None
        self._cache: tuple[int, object] | None = None

    def start(self) -> "SessionCamera":
        self._t0 = time.monotonic()
        return self

    def stop(self) -> None:
        self._t0 = None

    def latest(self):
        from vision.camera import Frame
        if self._t0 is None or not self.session.frames:
            return None
        frames = self.session.frames
        i = bisect.bisect_right(frames, time.monotonic() - self._t0, key=lambda f: f.t) - 1
        if i < 0:
            return None
        if self._cache is None or self._cache[0] != i:
            self._cache = (i, Frame(self.session.frames[i].t, self.session.read_frame(i), i))
        return self._cache[1]


def demo_sessions(*roots) -> list[Path]:
    """Session directories (those holding a session.json) directly under `roots`."""
    found = []
    for root in roots:
        root = Path(root)
        if root.is_dir():
            found += sorted(p for p in root.iterdir() if (p / "session.json").is_file())
    return found


def demo_replay(agent, session_dir, options: LiveOptions = LiveOptions(), sink=None) -> LocalDevices:
    """A LocalDevices replaying `session_dir` at real time; it finishes (status
    "finished", the clock stops) once the audio and the last reply have ended. The reply
    plays on `sink`; by default the local speaker, or a `MemorySink` (its `.audio` for a
    player) when there is none. Not started."""
    from speech.io import AudioDeviceError, DuplexDevice, FileSource, MemorySink
    from .session import load_session
    session = load_session(session_dir)
    if not (Path(session_dir) / "mic.wav").is_file():
        raise FileNotFoundError(f"{session_dir} has no mic.wav: a demo replay needs the audio")
    source = FileSource(Path(session_dir) / "mic.wav", realtime=True)
    speaker_note = None
    if sink is None:
        try:
            dev = DuplexDevice(options.input_device, options.output_device,
                               output_rate=agent.output_rate).start()
            sink = dev.sink
        except AudioDeviceError as e:
            sink = MemorySink(agent.output_rate, clock=time.monotonic)
            speaker_note = f"No speaker: the reply is shown as an audio player. ({e})"
    live = LocalDevices(agent, replace(options, camera=None), source=source, sink=sink,
                        camera=SessionCamera(session) if session.frames else None,
                        finish_at_end=True)
    if speaker_note:
        live.notice(speaker_note)
    return live


def attention_series(att) -> list[tuple[str, float, float]]:
    """(modality, t, weight) per distinct context time: video tokens of one frame and audio
    tokens of one instant are summed. `t` is seconds relative to the end of the question."""
    if att is None or len(att.weights) == 0:
        return []
    out = []
    for kind, name in ((2, "video"), (1, "audio")):
        sel = att.kinds == kind
        if not sel.any():
            continue
        times, inv = np.unique(np.round(att.times[sel], 3), return_inverse=True)
        sums = np.bincount(inv, weights=att.weights[sel], minlength=len(times))
        out += [(name, float(t), float(w)) for t, w in zip(times, sums)]
    return out


def probe_devices(options: LiveOptions) -> list[str]:
    """Notices for what is missing locally (no microphone / speaker / camera), [] if all is
    there. Opens and closes each device once; never raises."""
    from speech.io import AudioDeviceError, DuplexDevice
    from vision.camera import Camera, CameraError
    notes = []
    try:
        DuplexDevice(options.input_device, options.output_device).close()
    except AudioDeviceError as e:
        notes.append(f"No usable microphone/speaker on this machine: {e}")
    except Exception as e:  # a broken sound stack must not take the app down
        notes.append(f"The sound card could not be opened: {e!r}")
    if options.camera is not None:
        try:
            cam = Camera(options.camera, open_timeout=3.0)
            cam.start()
            cam.stop()
        except CameraError as e:
            notes.append(f"No camera: {e}")
    return notes


