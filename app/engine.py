"""The session engine: typed frames through small processors.

    AudioIn/VideoIn/Control -> [Recorder] -> VAD -> TurnSegmenter -> Scene -> Reply -> outputs

Live, browser and replay sessions all run this; they differ only in where input frames come
from and where output frames go (`on_output`). Input is pushed from the caller's thread
(VAD and scene encoding happen there, as inputs arrive); replies are generated on a worker
thread (`threaded=True`) so capture and playback never stall, or inline on a virtual clock
for as-fast-as-possible replay (`threaded=False`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import numpy as np
import torch

from fusion.generator import GenerationOptions, Generator, PCMChunk, TextToken, GenerationDone
from fusion.inputs import SceneEncoder
from speech.audio import check_pcm
from speech.constants import END_OF_TURN_SILENCE, QUESTION_PAD, SAMPLE_RATE, SAMPLER_FPS
from speech.vad import StreamingVAD, VADOptions
from vision.camera import Frame as CamFrame, FrameSampler

from .agent import Agent
from .frames import (AudioIn, AudioOut, Control, Frame, Interrupt, SpeechEnd, SpeechStart,
                     TextOut, TurnDone, TurnEnd, TurnMetrics, VideoIn)

log = logging.getLogger("tandem.engine")


@dataclass(frozen=True)
class EngineOptions:
    end_of_turn_silence: float = END_OF_TURN_SILENCE  # s of silence that ends a user turn
    vad_threshold: float = 0.5
    min_turn_seconds: float = 0.3       # shorter utterances are not turns (coughs, clicks)
    question_pad: float = QUESTION_PAD  # s of audio kept before the VAD's speech start
    barge_in: bool = True               # user speech during a reply stops it
    half_duplex: bool = False           # mute the mic while the agent speaks (no echo cancel)
    sampler_fps: float = SAMPLER_FPS
    threaded: bool = True
    generation: GenerationOptions = field(default_factory=GenerationOptions)

    def __post_init__(self):
        if not 0.05 <= self.end_of_turn_silence <= 5.0:
            raise ValueError(f"end_of_turn_silence must be within [0.05, 5] s, got {self.end_of_turn_silence}")
        if not 0 < self.vad_threshold < 1:
            raise ValueError(f"vad_threshold must be within (0, 1), got {self.vad_threshold}")
        if self.sampler_fps <= 0:
            raise ValueError(f"sampler_fps must be > 0, got {self.sampler_fps}")


class Processor:
    def process(self, frame: Frame) -> Iterable[Frame]:
        yield frame


class VADProcessor(Processor):
    def __init__(self, opts: EngineOptions, speaking: Callable[[float], bool]):
        self.vad = StreamingVAD(VADOptions(threshold=opts.vad_threshold,
                                           min_silence_ms=int(opts.end_of_turn_silence * 1000)))
        self.half_duplex, self.speaking = opts.half_duplex, speaking

    def process(self, frame):
        yield frame
        if isinstance(frame, AudioIn):
            pcm = frame.pcm
            if self.half_duplex and self.speaking(frame.t):
                pcm = np.zeros_like(pcm)  # muted: the clock still advances
            for e in self.vad.feed(pcm):
                yield SpeechStart(e.t) if e.kind == "start" else SpeechEnd(e.t)
        elif isinstance(frame, Control) and frame.kind == "reset":
            self.vad.reset()

    def close(self) -> None:
        self.vad.close()


class TurnSegmenter(Processor):
    def __init__(self, opts: EngineOptions, replying: Callable[[float], bool]):
        self.opts, self.replying = opts, replying
        self.turn, self.start, self.now = 0, None, 0.0

    def process(self, frame):
        yield frame
        if isinstance(frame, AudioIn):
            self.now = frame.t + len(frame.pcm) / SAMPLE_RATE
        elif isinstance(frame, SpeechStart):
            self.start = frame.t
            if self.opts.barge_in and self.replying(frame.t):
                yield Interrupt(frame.t, self.turn, "barge-in")
        elif isinstance(frame, SpeechEnd) and self.start is not None:
            if frame.t - self.start >= self.opts.min_turn_seconds:
                self.turn += 1
                yield TurnEnd(self.now, self.turn, self.start, frame.t)
            self.start = None
        elif isinstance(frame, Control):
            yield Interrupt(frame.t, self.turn, "control" if frame.kind == "interrupt" else "reset")


class SceneProcessor(Processor):
    def __init__(self, scene: SceneEncoder, fps: float):
        self.scene, self.sampler = scene, FrameSampler(fps)

    def process(self, frame):
        if isinstance(frame, AudioIn):
            self.scene.push_audio(frame.pcm)
        elif isinstance(frame, VideoIn):
            if self.sampler.offer(CamFrame(frame.t, frame.image, 0)):
                self.scene.push_frame(frame.t, frame.image)
        elif isinstance(frame, Control) and frame.kind == "reset":
            self.scene.reset()
            self.sampler.reset()
        yield frame


@dataclass
class ContextAttention:
    """The aggregator's attention of one turn's prefix, summed over clues (for display)."""
    turn: int
    weights: np.ndarray       # (S,) attention on each context token
    times: np.ndarray         # (S,) token time, s relative to the end of the question
    kinds: np.ndarray         # (S,) 1 = scene audio, 2 = video


class ReplyProcessor(Processor):
    """Starts a reply at each TurnEnd; stops it on Interrupt. Emits TextOut/AudioOut/TurnDone
    through `emit` (from the worker thread when threaded)."""

    def __init__(self, agent: Agent, scene: SceneEncoder, opts: EngineOptions, emit: Callable[[Frame], None]):
        self.agent, self.scene, self.opts, self.emit = agent, scene, opts, emit
        self.generator = Generator(agent.model, agent.codec, opts.generation)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.active_turn = 0            # turn whose reply is being generated (0: none)
        self.playback_end = -1.0        # session s when the current reply's audio ends
        self.last_attention: ContextAttention | None = None  # of the latest reply's prefix

    def replying(self, t: float) -> bool:
        return self.active_turn != 0 or t < self.playback_end

    def process(self, frame):
        if isinstance(frame, Interrupt):
            self.cancel(join=False)     # before the Interrupt goes out: no audio after it
        yield frame
        if isinstance(frame, Interrupt):
            self.cancel()               # then wait for the reply's thread (its TurnDone)
        if isinstance(frame, TurnEnd):
            self.cancel()
            q0 = max(0.0, frame.speech_start - self.opts.question_pad)
            feats = self.scene.features(q0, min(frame.speech_end, self.scene.now))
            self._cancel = threading.Event()
            self.active_turn = frame.turn
            args = (frame, feats, self._cancel, time.perf_counter())
            if self.opts.threaded:
                self._thread = threading.Thread(target=self._generate, args=args, daemon=True,
                                                name=f"reply-{frame.turn}")
                self._thread.start()
            else:
                self._generate(*args)

    def cancel(self, join: bool = True):
        """Stops the reply: once the event is set (under the lock `out` emits under) no more
        of its output goes out; `join` also waits for its thread (the generator step in
        flight) to end."""
        with self._lock:
            self._cancel.set()
            self.playback_end = -1.0
        if join and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None

    def wait(self, timeout: float | None = None):
        if self._thread is not None:
            self._thread.join(timeout)

    def _generate(self, turn: TurnEnd, feats, cancel: threading.Event, wall0: float):
        sr = self.agent.codec.sample_rate
        text, first_ready, first_audio, samples, done = "", None, None, 0, None
        clock = lambda: turn.t + (time.perf_counter() - wall0)  # noqa: E731  session time

        def out(frame) -> bool:
            with self._lock:
                if cancel.is_set():
                    return False
                self.emit(frame)
                return True
        try:
            with torch.inference_mode():
                prefix = self.agent.model.prefix(feats)
            self.last_attention = ContextAttention(
                turn.turn, prefix.attn[0].sum(0).float().cpu().numpy(),
                prefix.context_times[0].float().cpu().numpy(), prefix.context_kind[0].cpu().numpy())
            for ev in self.generator.run(prefix, t0=wall0):
                if cancel.is_set():
                    break
                if isinstance(ev, TextToken):
                    text += ev.text
                    out(TextOut(clock(), turn.turn, ev.text, text))
                elif isinstance(ev, PCMChunk):
                    t = clock()
                    if first_audio is None:
                        first_ready, first_audio = time.perf_counter() - wall0, t
                        with self._lock:
                            self.playback_end = t
                    if out(AudioOut(t, turn.turn, ev.pcm, sr, samples)):
                        samples += len(ev.pcm)
                        with self._lock:
                            self.playback_end = max(self.playback_end, t) + len(ev.pcm) / sr
                elif isinstance(ev, GenerationDone):
                    done = ev
        except Exception:  # a failed reply must not take the session down
            log.exception("reply generation failed for turn %d", turn.turn)
        stats = done.stats if done else None
        m = TurnMetrics(
            turn=turn.turn, speech_start=turn.speech_start, speech_end=turn.speech_end,
            decision=turn.t, first_audio=first_audio,
            response_latency=None if first_audio is None else first_audio - turn.speech_end,
            compute_latency=first_ready, reply_seconds=samples / sr,
            generation_rtf=stats.real_time_factor if stats else None,
            text=done.text if done else text, interrupted=cancel.is_set(),
            backbone_forwards=stats.backbone_forwards if stats else 0,
            mode=self.opts.generation.mode)
        with self._lock:
            if self.active_turn == turn.turn:
                self.active_turn = 0
        self.emit(TurnDone(clock(), m))


class Engine:
    """One conversation. `push` input frames (from any one thread); outputs go to `on_output`."""

    def __init__(self, agent: Agent, on_output: Callable[[Frame], None],
                 options: EngineOptions = EngineOptions(), recorder=None):
        self.agent, self.options, self.on_output = agent, options, on_output
        self.scene = SceneEncoder(agent.model, max_fps=2 * options.sampler_fps)
        self._emit_lock = threading.Lock()
        self.reply = ReplyProcessor(agent, self.scene, options, self._emit)
        self.processors: list[Processor] = []
        if recorder is not None:
            self.processors.append(recorder)
        self.segmenter = TurnSegmenter(options, self.reply.replying)
        self.processors += [VADProcessor(options, self.reply.replying), self.segmenter,
                            SceneProcessor(self.scene, options.sampler_fps),
                            self.reply]
        self.recorder = recorder

    @property
    def now(self) -> float:
        return self.scene.now

    def push(self, frame: Frame) -> None:
        # Depth first: each derived frame is emitted as soon as it leaves the last processor,
        # so SpeechEnd/TurnEnd go out before the reply they start (no reply_text first).
        for f in self._run(frame, 0):
            if not isinstance(f, (AudioIn, VideoIn, Control)):
                self._emit(f)

    def _run(self, frame: Frame, i: int):
        if i == len(self.processors):
            yield frame
            return
        for out in self.processors[i].process(frame):
            yield from self._run(out, i + 1)

    def push_audio(self, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
        """Microphone audio: mono float32 at 16 kHz (a clear ValueError otherwise); an empty
        chunk is a no-op (streams may hand one over)."""
        if getattr(pcm, "ndim", 0) == 1 and len(pcm) == 0 and sample_rate == SAMPLE_RATE:
            return
        check_pcm(pcm, sample_rate, SAMPLE_RATE, name="microphone audio")
        self.push(AudioIn(self.now, np.asarray(pcm, np.float32)))

    def push_frame(self, image: np.ndarray, t: float | None = None) -> None:
        self.push(VideoIn(self.now if t is None else t, image))

    def _emit(self, frame: Frame) -> None:
        with self._emit_lock:
            if self.recorder is not None:
                self.recorder.record_output(frame)
            self.on_output(frame)

    def settled(self) -> bool:
        """No user speech open, no reply being made or playing."""
        return self.segmenter.start is None and not self.reply.replying(self.now)

    def wait_idle(self, timeout: float | None = None) -> None:
        self.reply.wait(timeout)

    def close(self) -> None:
        self.reply.cancel()
        for p in self.processors:
            if isinstance(p, VADProcessor):
                p.close()                       # its model serves the next session
        # The engine and its reply processor reference each other, so they wait for the
        # cyclic GC; free the generation buffers (tens of MB with the shipped model) now.
        self.reply.generator = None
        if self.recorder is not None:
            self.recorder.close()


def with_generation(options: EngineOptions, **kw) -> EngineOptions:
    return replace(options, generation=replace(options.generation, **kw))
