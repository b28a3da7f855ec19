"""Desktop live conversation: the local camera and sound card feeding a session Engine.

    camera (device or video file) ──┐
    microphone (DuplexDevice.source) ┴─ capture thread ─► Engine ─► AudioOut ─► speaker sink
                                                            └─► Interrupt ─► sink.clear()

`LiveSession` turns engine output frames into playback plus a bounded view of the
conversation for a UI (`snapshot()`): transcript, per-turn metrics, latest preview frame and
the aggregator's attention for the last turn. `LocalDevices` adds the local devices and the
capture thread; other front ends (browser devices, demo replay) reuse `LiveSession`.
A LocalDevices is one conversation: `start()` once, `stop()` once.

With a `scene` (app.demo_scene.DemoScene) the agent sees the rendered demo world instead of
a camera and hears its beeps mixed into the microphone, both on the session clock.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from speech.constants import SAMPLE_RATE
from speech.resample import StreamResampler

if TYPE_CHECKING:
    from .engine import EngineOptions

log = logging.getLogger("tandem.live")

MODES = ("vanilla", "mctp")
FINISH_AFTER = 0.5                 # s of silence after a replay's end-of-turn wait: finished


@dataclass(frozen=True)
class LiveOptions:
    """camera: device index, video file (looped at its own fps), stream URL, or None for none.
    require_camera: False runs audio-only (with a notice) when the camera cannot be opened."""
    mode: str = "mctp"
    camera: int | str | None = 0
    input_device: int | str | None = None
    output_device: int | str | None = None
    require_camera: bool = False
    half_duplex: bool = False          # mute the mic while the agent speaks (no echo cancel)
    history: int = 200                 # transcript lines and turns kept for the UI
    silence_chunk: float = 0.02        # s: silence fed once the audio source has ended
    user_words: bool = True            # show what the user said (when the recogniser is installed)
    engine: "EngineOptions | None" = None  # None: EngineOptions() defaults

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        if not 0 < self.silence_chunk <= 0.5:
            raise ValueError(f"silence_chunk must be within (0, 0.5] s, got {self.silence_chunk}")


@dataclass
class TranscriptLine:
    turn: int
    role: str                          # "user" | "assistant" | "system"
    text: str


@dataclass(frozen=True)
class LiveSnapshot:
    """What a UI shows, copied out under the session lock."""
    status: str
    running: bool
    notices: tuple[str, ...]
    transcript: tuple[TranscriptLine, ...]
    metrics: tuple                     # (TurnMetrics, ...) oldest first
    preview: np.ndarray | None         # (H, W, 3) uint8 RGB
    attention: object                  # app.engine.ContextAttention of the last turn, or None
    clock: float                       # session s (mic samples pushed / 16 kHz)
    reply_audio_seconds: float         # reply audio handed to the sink so far
    error: str | None


class LiveSession:
    """Engine output -> sink playback (Interrupt clears it) + the UI state. Subclasses push
    input into `self.engine` (created by `_open_engine`)."""

    def __init__(self, agent, options: LiveOptions = LiveOptions(), scene=None):
        from .live_words import UserWords
        self.agent, self.options, self.scene = agent, options, scene
        self._fed = 0                                  # mic samples pushed (16 kHz)
        self._scene_frame = -1                         # index of the scene frame last pushed
        self._words = UserWords(self._set_user_words) if options.user_words else None
        self._user_lines: dict[int, TranscriptLine] = {}
        self._lock = threading.Lock()
        self._transcript: collections.deque = collections.deque(maxlen=options.history)
        self._metrics: collections.deque = collections.deque(maxlen=options.history)
        self._notices: list[str] = []
        self._preview: np.ndarray | None = None if scene is None else scene.frame(0.0)  # BGR
        self.preview_id = 0                           # counts preview updates
        self._attention = None
        self._reply_line: TranscriptLine | None = None
        self._out_rs: StreamResampler | None = None
        self.status, self.error, self.reply_audio_seconds = "idle", None, 0.0
        self.engine = None
        self.sink = None
        self.on_turn_done: Callable | None = None    # extra hook, e.g. for a recorder or test

    # --- engine and outputs -------------------------------------------------------------------
    def _open_engine(self, sink) -> None:
        from .engine import Engine, EngineOptions, with_generation
        opts = self.options.engine or EngineOptions()
        opts = replace(with_generation(opts, mode=self.options.mode),
                       half_duplex=self.options.half_duplex or opts.half_duplex)
        self.sink = sink
        if sink.sample_rate != self.agent.output_rate:
            self._out_rs = StreamResampler(self.agent.output_rate, sink.sample_rate)
        self.engine = Engine(self.agent, self._on_output, opts)

    def _on_output(self, f) -> None:
        from .frames import AudioOut, Interrupt, SpeechStart, TextOut, TurnDone, TurnEnd
        if isinstance(f, AudioOut):
            pcm = f.pcm if self._out_rs is None else self._out_rs.feed(f.pcm)
            self.sink.write(pcm)
            with self._lock:
                self.reply_audio_seconds += len(f.pcm) / f.sample_rate
                self.status = "speaking"
        elif isinstance(f, Interrupt):
            self.sink.clear()
            if self._out_rs is not None:   # drop its look-ahead of the stopped reply too
                self._out_rs = type(self._out_rs)(self.agent.output_rate, self.sink.sample_rate)
            self._add(f.turn, "system", f"(reply interrupted: {f.reason})")
        elif isinstance(f, SpeechStart):
            self._set_status("hearing you")
        elif isinstance(f, TurnEnd):
            line = TranscriptLine(f.turn, "user", f"speech, {f.speech_end - f.speech_start:.1f} s")
            with self._lock:
                self._transcript.append(line)
                self._user_lines[f.turn] = line
            if self._words is not None:
                self._words.heard(f.turn, f.speech_start, f.speech_end)
            with self._lock:
                self._reply_line = TranscriptLine(f.turn, "assistant", "…")
                self._transcript.append(self._reply_line)
                self.status = "thinking"
        elif isinstance(f, TextOut):
            with self._lock:
                if self._reply_line is not None and self._reply_line.turn == f.turn:
                    self._reply_line.text = f.text
        elif isinstance(f, TurnDone):
            self._turn_done(f.metrics)

    def _turn_done(self, m) -> None:
        if self._out_rs is not None:
            self.sink.write(self._out_rs.flush())
            self._out_rs = type(self._out_rs)(self.agent.output_rate, self.sink.sample_rate)
        att = self.engine.reply.last_attention
        with self._lock:
            self._metrics.append(m)
            if att is not None and att.turn == m.turn:
                self._attention = att
            line = self._reply_line
            if line is not None and line.turn == m.turn:
                line.text = (m.text or "(no text)") + (" (interrupted)" if m.interrupted else "")
            self.status = "listening"
        if self._words is not None:             # off the reply's path: after it is made
            self._words.transcribe(m.turn)
        if self.on_turn_done is not None:
            self.on_turn_done(m)

    def _set_user_words(self, turn: int, text: str) -> None:
        with self._lock:
            line = self._user_lines.pop(turn, None)
            if line is not None and text:
                line.text = f"“{text}”"

    # --- input ------------------------------------------------------------------------------
    def _feed_audio(self, pcm: np.ndarray) -> None:
        """Microphone audio (16 kHz float32) into the engine: with a demo scene, its sound
        is mixed in and its frame pushed whenever a new one is due."""
        i0 = self._fed
        self._fed += len(pcm)
        if self._words is not None:
            self._words.keep(i0, pcm)
        if self.scene is not None:
            pcm = self.scene.hear(i0, pcm)
        self.engine.push_audio(pcm)
        if self.scene is not None:
            t = self._fed / SAMPLE_RATE
            k = round(self.scene.frame_time(t) * self.scene.options.fps)
            if k != self._scene_frame:
                self._scene_frame = k
                img = self.scene.frame(t)
                self.engine.push_frame(img)
                self.set_preview(img)

    @property
    def clock(self) -> float:
        """Session seconds (microphone audio pushed so far)."""
        return self._fed / SAMPLE_RATE

    def _add(self, turn: int, role: str, text: str) -> None:
        with self._lock:
            self._transcript.append(TranscriptLine(turn, role, text))

    def _set_status(self, status: str) -> None:
        with self._lock:
            self.status = status

    def notice(self, text: str) -> None:
        """Show `text` to the user (device problems, source ended, ...)."""
        with self._lock:
            if text in self._notices:
                return
            self._notices.append(text)
        log.warning(text)

    def set_preview(self, bgr: np.ndarray) -> None:
        with self._lock:
            self._preview = bgr
            self.preview_id += 1

    @property
    def running(self) -> bool:
        return False

    def interrupt(self) -> None:
        """Stop the current reply (as if the user had barged in)."""
        from .frames import Control
        if self.engine is not None:
            self.engine.push(Control(self.engine.now, "interrupt"))

    def snapshot(self) -> LiveSnapshot:
        with self._lock:
            prev = None if self._preview is None else np.ascontiguousarray(self._preview[..., ::-1])
            return LiveSnapshot(
                status=self.status, running=self.running, notices=tuple(self._notices),
                transcript=tuple(replace(t) for t in self._transcript),
                metrics=tuple(self._metrics), preview=prev, attention=self._attention,
                clock=0.0 if self.engine is None else self.engine.now,
                reply_audio_seconds=self.reply_audio_seconds,
                error=None if self.error is None else str(self.error))


class LocalDevices(LiveSession):
    """The local device path. `source`/`sink` replace the sound card (files, virtual devices,
    replay) and `camera` replaces `options.camera` (anything with start/stop/latest, such as
    `vision.camera.Camera`); what is given here is closed by `stop()`.

    `start()` raises AudioDeviceError when there is no usable microphone/speaker, and
    CameraError when the camera cannot be opened and `options.require_camera` is set;
    otherwise a missing camera becomes a notice and the conversation runs audio-only."""

    def __init__(self, agent, options: LiveOptions = LiveOptions(), *, source=None, sink=None,
                 camera=None, scene=None, finish_at_end: bool = False):
        super().__init__(agent, options, scene)
        self.finish_at_end = finish_at_end   # a replay: finish once its audio and reply end
        if (source is None) != (sink is None):
            raise ValueError("give both source= and sink= (or neither, for the sound card)")
        self._source, self._sink, self._camera = source, sink, camera
        self._device = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "LocalDevices":
        from speech.io import DuplexDevice
        from vision.camera import Camera, CameraError
        if self._started:
            raise RuntimeError("a LocalDevices runs once: create a new one to start again")
        self._started = True
        o = self.options
        if self._source is None:
            self._set_status("opening the microphone and speaker")
            self._device = DuplexDevice(o.input_device, o.output_device, input_rate=SAMPLE_RATE,
                                        output_rate=self.agent.output_rate).start()
            self._source, self._sink = self._device.source, self._device.sink
        try:
            if self.scene is not None:
                self._camera = None              # the demo scene is the camera
            elif self._camera is not None or o.camera is not None:
                try:
                    self._set_status("opening the camera")
                    if self._camera is None:
                        self._camera = Camera(o.camera, loop=True)
                    self._camera.start()
                except CameraError as e:
                    self._camera = None
                    if o.require_camera:
                        self._set_status("no camera")
                        raise
                    self.notice(f"No camera: running audio-only. {e}")
            else:
                self.notice("No camera selected: running audio-only.")
            self._open_engine(self._sink)
            self._in_rs = StreamResampler(self._source.sample_rate, SAMPLE_RATE)
        except BaseException:
            self._close_audio()
            raise
        self._thread = threading.Thread(target=self._capture, name="tandem-capture", daemon=True)
        self._set_status("listening")
        self._thread.start()
        return self

    def _capture(self) -> None:
        from speech.io import AudioDeviceError
        eng, src, cam = self.engine, self._source, self._camera
        last_index, ended, finished = -1, None, False
        silence = np.zeros(int(round(self.options.silence_chunk * SAMPLE_RATE)), np.float32)
        settle = eng.options.longest_turn_silence + FINISH_AFTER
        try:
            while not self._stop.is_set():
                chunk = None if ended is not None else src.read(timeout=0.1)
                if chunk is None:          # a file or replay ended: the clock runs on in silence
                    if ended is None:
                        ended = self.clock
                        self.notice("The replay's audio ended; its last reply plays out."
                                    if self.finish_at_end else
                                    "The audio input ended; the session continues in silence.")
                    if self.finish_at_end and self.clock - ended >= settle and eng.settled():
                        finished = True    # the clock stops with the replay
                        break
                    if self._stop.wait(self.options.silence_chunk):
                        break
                    chunk = silence
                else:
                    chunk = self._in_rs.feed(chunk)
                if chunk.size:
                    self._feed_audio(chunk)
                if cam is not None and getattr(cam, "ended", False):
                    self.notice(f"The camera stopped ({cam.error}); continuing audio-only.")
                    cam = None
                frame = cam.latest() if cam is not None else None
                if frame is not None and frame.index != last_index:
                    last_index = frame.index
                    eng.push_frame(frame.image)
                    self.set_preview(frame.image)
        except AudioDeviceError as e:
            self.error = e
            self.notice(f"The microphone stopped: {e}")
        except Exception as e:  # shown in the UI; the app keeps running
            log.exception("live capture failed")
            self.error = e
        finally:
            self._set_status("finished" if finished else
                             "stopped" if self._stop.is_set() else "failed")

    def stop(self) -> None:
        """Stop capturing and replying; drop queued speech; close what was opened/given."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if self.engine is not None:
            self.engine.close()
        if self._camera is not None:
            self._camera.stop()
        if self._sink is not None:
            self._sink.clear()
        self._close_audio()
        self._set_status("stopped")

    def _close_audio(self) -> None:
        if self._device is not None:
            self._device.close()
        else:
            for end in (self._source, self._sink):
                if end is not None:
                    end.close()

    def __enter__(self) -> "LocalDevices":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
