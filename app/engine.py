"""The session engine: typed frames through small processors.

    AudioIn/VideoIn/Control -> [Recorder] -> VAD -> TurnSegmenter -> Scene -> Reply -> outputs

Turn taking: with a turn-end model (`EngineOptions.turn_end_model`) the VAD reports a pause
after `turn_end_pause` s of silence; the segmenter asks the end-of-turn predictor
(speech/turn_end.py) on the microphone's last seconds. P >= `turn_end_threshold` commits the
turn (TurnEnd, reason "predictor"); otherwise a TurnCandidate lets the reply processor start
the reply preemptively with its output held, committed when the silence reaches
`max_end_of_turn_silence` (reason "max_silence") or dropped without a sound when the user
speaks again (TurnResumed: no Interrupt, not a barge-in; the turn keeps its first speech
start). Without a model a fixed `end_of_turn_silence` ends each turn (reason "silence").

Live, browser and replay sessions all run this; they differ only in where input frames come
from and where output frames go (`on_output`). Input is pushed from the caller's thread
(VAD and scene encoding happen there, as inputs arrive); replies are generated on a worker
thread (`threaded=True`) so capture and playback never stall, or inline on a virtual clock
for as-fast-as-possible replay (`threaded=False`).
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from fusion.generator import GenerationOptions, Generator, PCMChunk, TextToken, GenerationDone
from fusion.inputs import SceneEncoder
from speech.audio import check_pcm
from speech.constants import (END_OF_TURN_SILENCE, QUESTION_PAD, SAMPLE_RATE, SAMPLER_FPS,
                              TURN_END_PAUSE, TURN_END_THRESHOLD)
from speech.vad import StreamingVAD, VADOptions
from vision.camera import Frame as CamFrame, FrameSampler

from .agent import Agent
from .frames import (AudioIn, AudioOut, Control, Frame, Interrupt, SpeechEnd, SpeechStart,
                     TextOut, TurnCandidate, TurnDone, TurnEnd, TurnMetrics, TurnResumed, VideoIn)

log = logging.getLogger("tandem.engine")

DEFAULT_TURN_END_MODEL = Path(__file__).resolve().parent.parent / "assets" / "turn_end.safetensors"
INTERNAL_FRAMES = (TurnCandidate, TurnResumed)   # never sent to on_output


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
    # turn taking with the end-of-turn predictor (None: the fixed end_of_turn_silence)
    turn_end_model: str | None = None   # speech/turn_end.py model file (.safetensors)
    turn_end_pause: float = TURN_END_PAUSE  # s of silence at which the predictor is asked
    turn_end_threshold: float = TURN_END_THRESHOLD  # P(complete) that commits the turn at a pause
    max_end_of_turn_silence: float = 1.2  # s of silence that ends the turn anyway
    preemptive_generation: bool = True  # start the reply at the pause, output held
    preemptive_pause: float | None = 0.1  # s of silence at which the held reply starts
                                        # (None: at turn_end_pause); shorter hides compute

    def __post_init__(self):
        if not 0.05 <= self.end_of_turn_silence <= 5.0:
            raise ValueError(f"end_of_turn_silence must be within [0.05, 5] s, got {self.end_of_turn_silence}")
        if self.turn_end_model is not None and not str(self.turn_end_model):
            raise ValueError("turn_end_model must be a model path or None (the fixed silence)")
        if self.preemptive_pause is not None and not 0.05 <= self.preemptive_pause <= self.turn_end_pause:
            raise ValueError(f"preemptive_pause must be None or within [0.05, turn_end_pause="
                             f"{self.turn_end_pause}] s, got {self.preemptive_pause}")
        if not 0.05 <= self.turn_end_pause <= 2.0:
            raise ValueError(f"turn_end_pause must be within [0.05, 2] s, got {self.turn_end_pause}")
        if not 0 < self.turn_end_threshold <= 1:
            raise ValueError(f"turn_end_threshold must be within (0, 1], got {self.turn_end_threshold}")
        if not self.turn_end_pause < self.max_end_of_turn_silence <= 5.0:
            raise ValueError(f"max_end_of_turn_silence must be > turn_end_pause "
                             f"({self.turn_end_pause} s) and <= 5 s, got {self.max_end_of_turn_silence}")
        if not 0 < self.vad_threshold < 1:
            raise ValueError(f"vad_threshold must be within (0, 1), got {self.vad_threshold}")
        if self.sampler_fps <= 0:
            raise ValueError(f"sampler_fps must be > 0, got {self.sampler_fps}")

    @property
    def shortest_turn_silence(self) -> float:
        """The shortest silence that may end a turn (the VAD's stop hangover)."""
        if not self.turn_end_model:
            return self.end_of_turn_silence
        if self.preemptive_generation and self.preemptive_pause is not None:
            return self.preemptive_pause
        return self.turn_end_pause

    @property
    def longest_turn_silence(self) -> float:
        """The silence after which a turn has surely ended."""
        return self.max_end_of_turn_silence if self.turn_end_model else self.end_of_turn_silence


@functools.lru_cache(maxsize=4)
def _load_turn_end(path: str, mtime: float):
    from speech.turn_end import TurnEndPredictor
    return TurnEndPredictor.load(path)


def load_turn_end(path):
    """The TurnEndPredictor in `path` (loaded once per file version)."""
    p = Path(path)
    if p.is_dir():
        p = p / "turn_end.safetensors"
    return _load_turn_end(str(p), p.stat().st_mtime if p.is_file() else 0.0)


def turn_end_choice(choice: str | None, say: Callable[[str], None] | None = None) -> str | None:
    """`--turn-end` -> EngineOptions.turn_end_model: "model" (the default) is the shipped
    assets/turn_end.safetensors when present, else the fixed silence; "silence" the fixed
    silence; anything else a model path. Says which in one line (`say`, default: the log)."""
    choice = "model" if choice in (None, "", "model") else choice
    if choice == "silence":
        path = None
    elif choice == "model":
        path = str(DEFAULT_TURN_END_MODEL) if DEFAULT_TURN_END_MODEL.is_file() else None
    else:
        if not Path(choice).exists():
            raise FileNotFoundError(f"no end-of-turn model at {choice} (--turn-end model|silence|PATH)")
        path = choice
    if path is not None:
        line = f"turn taking: end-of-turn predictor {path} (asked at a pause)"
    elif choice == "model":
        line = (f"turn taking: no end-of-turn model at {DEFAULT_TURN_END_MODEL}; a fixed "
                f"{END_OF_TURN_SILENCE:.1f} s silence ends each turn")
    else:
        line = f"turn taking: a fixed {END_OF_TURN_SILENCE:.1f} s silence ends each turn"
    (say or log.info)(line)
    return path


class Processor:
    def process(self, frame: Frame) -> Iterable[Frame]:
        yield frame


class VADProcessor(Processor):
    def __init__(self, opts: EngineOptions, speaking: Callable[[float], bool]):
        self.vad = StreamingVAD(VADOptions(threshold=opts.vad_threshold,
                                           min_silence_ms=int(round(opts.shortest_turn_silence * 1000))))
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
    """SpeechStart/SpeechEnd -> TurnEnd. With a predictor, a SpeechEnd (a turn_end_pause of
    silence) is a candidate: complete (P >= threshold) commits it, otherwise a TurnCandidate
    waits for max_end_of_turn_silence (commit) or for more speech (TurnResumed)."""

    def __init__(self, opts: EngineOptions, replying: Callable[[float], bool], predictor=None):
        self.opts, self.replying, self.predictor = opts, replying, predictor
        self.turn, self.start, self.now = 0, None, 0.0
        self.pending: TurnCandidate | None = None   # a pause waiting for its decision
        self.discarded = 0                           # preemptive starts dropped this turn
        self._asked = False                          # the predictor has judged `pending`
        self.pauses: list[tuple[float, float]] = []  # silences inside the open turn
        self._tail = np.zeros(0, np.float32)         # the mic's last window (predictor input)
        self._window = predictor.config.window_samples if predictor is not None else 0

    def process(self, frame):
        yield frame
        if isinstance(frame, AudioIn):
            self.now = frame.t + len(frame.pcm) / SAMPLE_RATE
            if self.predictor is not None:
                self._tail = np.concatenate([self._tail, frame.pcm])[-self._window:]
            if self.pending is not None:
                te = self._ask()
                if te is None and self.now - self.pending.speech_end >= \
                        self.opts.max_end_of_turn_silence - 1e-9:
                    te = self._commit(self.pending, "max_silence")
                if te is not None:
                    yield te
        elif isinstance(frame, SpeechStart):
            if self.pending is not None:     # the user goes on: the same turn, no barge-in
                if self.opts.preemptive_generation:
                    self.discarded += 1
                yield TurnResumed(frame.t, self.pending.turn)
                self.pauses.append((self.pending.speech_end, frame.t))
                self.pending = None
                return
            self.start = frame.t
            if self.opts.barge_in and self.replying(frame.t):
                yield Interrupt(frame.t, self.turn, "barge-in")
        elif isinstance(frame, SpeechEnd) and self.start is not None:
            if frame.t - self.start < self.opts.min_turn_seconds:
                self.start, self.discarded, self.pauses = None, 0, []
            elif self.predictor is None:
                self.turn += 1
                yield TurnEnd(self.now, self.turn, self.start, frame.t)
                self.start = None
            else:
                self.pending, self._asked = TurnCandidate(self.now, self.turn + 1, self.start, frame.t,
                                                          pauses=tuple(self.pauses)), False
                te = self._ask()        # complete at once: no held start
                yield self.pending if te is None else te
        elif isinstance(frame, Control):
            if self.pending is not None or frame.kind == "reset":
                self.start, self.pending, self.discarded, self.pauses = None, None, 0, []
            if frame.kind == "reset":
                self._tail = np.zeros(0, np.float32)
            yield Interrupt(frame.t, self.turn, "control" if frame.kind == "interrupt" else "reset")

    def _ask(self) -> TurnEnd | None:
        """Asks the predictor once the pending pause is turn_end_pause long; commits when
        it says complete."""
        c = self.pending
        if self._asked or self.now - c.speech_end < self.opts.turn_end_pause - 1e-9:
            return None
        self._asked = True
        c.probability = self._probability()
        return self._commit(c, "predictor") if c.probability >= self.opts.turn_end_threshold else None

    def _probability(self) -> float:
        x = self._tail
        if len(x) < self._window:
            x = np.concatenate([np.zeros(self._window - len(x), np.float32), x])
        return self.predictor.probability(x)

    def _commit(self, cand: TurnCandidate, reason: str) -> TurnEnd:
        self.turn = cand.turn
        te = TurnEnd(self.now, cand.turn, cand.speech_start, cand.speech_end, reason,
                     cand.probability, self.discarded, cand.pauses)
        self.start, self.pending, self.discarded, self.pauses = None, None, 0, []
        return te


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


class _Reply:
    """One reply being made. `held`: started preemptively at a TurnCandidate, its output kept
    in `buffer` until the TurnEnd commits it (`commit`) or a TurnResumed drops it."""

    def __init__(self, turn, held: bool):
        self.turn = turn                         # TurnCandidate (held) or TurnEnd
        self.held = held
        self.commit: TurnEnd | None = None if held else turn
        self.cancel = threading.Event()
        self.buffer: list[Frame] = []
        self.discarded = False
        self.finished: tuple | None = None       # (text, done, first_audio, samples)
        self.thread: threading.Thread | None = None
        self.deferred = None                     # inline (threaded=False): feats, run at commit


class ReplyProcessor(Processor):
    """Starts a reply at each TurnEnd (or, held, at a TurnCandidate); stops it on Interrupt;
    drops a held one at TurnResumed. Emits TextOut/AudioOut/TurnDone through `emit` (from the
    worker thread when threaded)."""

    def __init__(self, agent: Agent, scene: SceneEncoder, opts: EngineOptions, emit: Callable[[Frame], None]):
        self.agent, self.scene, self.opts, self.emit = agent, scene, opts, emit
        self.generator = Generator(agent.model, agent.codec, opts.generation)
        self._lock = threading.Lock()
        self._reply: _Reply | None = None
        self.active_turn = 0            # turn whose committed reply is being generated (0: none)
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
        elif isinstance(frame, TurnCandidate):
            if self.opts.preemptive_generation and self.active_turn == 0:
                self._start(frame, held=True)
        elif isinstance(frame, TurnResumed):
            self._discard(frame.turn)
        elif isinstance(frame, TurnEnd):
            r = self._reply
            if r is not None and r.held and not r.cancel.is_set() and r.turn.turn == frame.turn:
                self._commit(r, frame)
            else:
                self.cancel()
                self._start(frame, held=False)

    def _start(self, frame, held: bool):
        old = self._reply
        if old is not None and old.held:
            self._discard(old.turn.turn)
        if old is not None and old.thread is not None and old.thread is not threading.current_thread():
            old.thread.join()           # its generation is over (active_turn == 0): finishing
        q0 = max(0.0, frame.speech_start - self.opts.question_pad)
        # a hesitation's silence is no part of the question the model hears; as at the
        # question's start, question_pad s before the VAD's (late) restart stay in
        pad = self.opts.question_pad
        gaps = [(a, b - pad) for a, b in frame.pauses if b - pad > a]
        feats = self.scene.features(q0, min(frame.speech_end, self.scene.now), gaps=gaps)
        r = self._reply = _Reply(frame, held)
        if not held:
            self.active_turn = frame.turn
        elif not self.opts.threaded:
            # On the virtual clock nothing happens while a reply is generated inline, so a
            # held reply is generated at its commit, stamped from its candidate's time (as a
            # worker thread started then would have made it); a dropped one costs nothing.
            r.deferred = feats
            return
        args = (r, feats, time.perf_counter())
        if self.opts.threaded:
            r.thread = threading.Thread(target=self._generate, args=args, daemon=True,
                                        name=f"reply-{frame.turn}")
            r.thread.start()
        else:
            self._generate(*args)

    def _commit(self, r: _Reply, te: TurnEnd):
        """The held reply becomes the turn's reply: its output so far goes out now."""
        done = None
        if r.deferred is not None:      # inline: generate it now, from the candidate's time
            with self._lock:
                r.held, r.commit = False, te
                self.playback_end = -1.0
                self.active_turn = te.turn
            feats, r.deferred = r.deferred, None
            self._generate(r, feats, time.perf_counter())
            return
        with self._lock:
            r.held, r.commit = False, te
            self.playback_end = -1.0    # an older reply still playing is cut by this turn
            if r.finished is None:
                self.active_turn = te.turn
            for f in r.buffer:
                self._send(f, r)
            r.buffer = []
            if r.finished is not None:
                done = TurnDone(te.t, self._metrics(r))
        if done is not None:
            self.emit(done)

    def _discard(self, turn: int):
        """Drops the held reply of `turn` without a sound (the user went on speaking)."""
        with self._lock:
            r = self._reply
            if r is None or not r.held or r.turn.turn != turn:
                return
            r.cancel.set()
            r.discarded, r.buffer = True, []
        if r.thread is not None and r.thread is not threading.current_thread():
            r.thread.join()

    def _send(self, f: Frame, r: _Reply):
        """Under the lock: one output frame of a committed reply (never before its decision)."""
        f.t = max(f.t, r.commit.t)
        if isinstance(f, AudioOut):
            self.playback_end = max(self.playback_end, f.t) + len(f.pcm) / f.sample_rate
        self.emit(f)

    def cancel(self, join: bool = True):
        """Stops the reply: once the event is set (under the lock `out` emits under) no more
        of its output goes out; `join` also waits for its thread (the generator step in
        flight) to end."""
        with self._lock:
            r = self._reply
            if r is not None:
                r.cancel.set()
                if r.held:
                    r.discarded, r.buffer = True, []
            self.playback_end = -1.0
        if join and r is not None and r.thread is not None and r.thread is not threading.current_thread():
            r.thread.join()
            r.thread = None

    def wait(self, timeout: float | None = None):
        r = self._reply
        if r is not None and r.thread is not None:
            r.thread.join(timeout)

    def _generate(self, r: _Reply, feats, wall0: float):
        sr = self.agent.codec.sample_rate
        turn, cancel = r.turn, r.cancel
        text, first_audio, samples, done = "", None, 0, None
        clock = lambda: turn.t + (time.perf_counter() - wall0)  # noqa: E731  session time

        def out(frame) -> bool:
            with self._lock:
                if cancel.is_set():
                    return False
                if r.held:
                    r.buffer.append(frame)
                else:
                    self._send(frame, r)
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
                        first_audio = t
                    if out(AudioOut(t, turn.turn, ev.pcm, sr, samples)):
                        samples += len(ev.pcm)
                elif isinstance(ev, GenerationDone):
                    done = ev
        except Exception:  # a failed reply must not take the session down
            log.exception("reply generation failed for turn %d", turn.turn)
        with self._lock:
            r.finished = (text, done, first_audio, samples)
            if r.held or r.discarded:   # TurnDone at the commit; a dropped reply says nothing
                return
            if self.active_turn == r.commit.turn and self._reply is r:
                self.active_turn = 0
            m = self._metrics(r)
        self.emit(TurnDone(max(clock(), r.commit.t), m))

    def _metrics(self, r: _Reply) -> TurnMetrics:
        te = r.commit
        text, done, first_audio, samples = r.finished
        sr = self.agent.codec.sample_rate
        if first_audio is not None:
            first_audio = max(first_audio, te.t)   # a held reply sounds from its commit on
        stats = done.stats if done else None
        return TurnMetrics(
            turn=te.turn, speech_start=te.speech_start, speech_end=te.speech_end,
            decision=te.t, first_audio=first_audio,
            response_latency=None if first_audio is None else first_audio - te.speech_end,
            compute_latency=None if first_audio is None else first_audio - te.t,
            reply_seconds=samples / sr,
            generation_rtf=stats.real_time_factor if stats else None,
            text=done.text if done else text, interrupted=r.cancel.is_set(),
            backbone_forwards=stats.backbone_forwards if stats else 0,
            mode=self.opts.generation.mode, turn_end=te.reason, discarded_starts=te.discarded)


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
        predictor = None
        if options.turn_end_model:
            predictor = load_turn_end(options.turn_end_model)
        self.segmenter = TurnSegmenter(options, self.reply.replying, predictor)
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
            if not isinstance(f, (AudioIn, VideoIn, Control, *INTERNAL_FRAMES)):
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
