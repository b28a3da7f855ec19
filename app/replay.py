"""Replay a recorded session through the same Engine that runs live sessions.

Default: as fast as possible on a virtual clock (`threaded=False`: each reply is generated
inline at its end-of-turn decision and its audio stamped decision + compute time, so the
latencies are compute latencies; a reply started preemptively at a pause is generated
when its turn is committed, stamped from the pause, and never sounds before the commit).
`realtime=True`: the threaded engine, input paced at the recorded speed on the wall clock.

Writes OUT/report.json, OUT/summary.txt, OUT/agent.wav (the agent's voice on the session
timeline), OUT/turns/turn_NNN.wav (each reply as generated) and OUT/timeline.png.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from speech.constants import SAMPLE_RATE

from .agent import Agent
from .engine import Engine, EngineOptions
from .frames import (AudioOut, Frame, Interrupt, SpeechEnd, SpeechStart, TextOut, TurnDone,
                     TurnEnd, TurnMetrics)
from .replay_report import format_summary, hardware, match_questions, plot_timeline, summarize
from .session import Session, SessionError, SessionWriter, load_session

CHUNK = SAMPLE_RATE // 50      # 20 ms of microphone audio per push


@dataclass
class TurnResult:
    turn: int
    speech_start: float               # session s: the user's speech (VAD)
    speech_end: float
    decision: float                   # session s: end-of-turn decision
    first_audio: float | None         # session s: first reply audio sample out
    response_latency: float | None    # first_audio - speech_end
    compute_latency: float | None     # first audio chunk ready - decision (wall s)
    generation_rtf: float | None      # reply audio s / generation wall s
    reply_seconds: float              # reply audio generated
    played_seconds: float             # of it, placed on the timeline before a cut
    text: str
    tokens: list[str]
    audio_file: str | None            # "turns/turn_001.wav" (codec rate), None: no audio
    interrupted: bool
    interrupted_at: float | None      # session s where the reply was cut
    backbone_forwards: int
    question: str | None = None       # ground truth (demo-world "question" events)
    expected: str | None = None       # its version-1 answer ("green."); scored by the slot rule
    qtype: str | None = None
    correct: bool | None = None
    end_of_turn_wait: float | None = None  # decision - speech_end (frames.LATENCY_WORDS)
    turn_end: str | None = None       # what ended the turn: predictor | max_silence | silence
    discarded_starts: int = 0         # preemptive replies dropped in the turn (user went on)


@dataclass
class ReplayReport:
    session: str
    out_dir: str
    model: str
    mode: str
    realtime: bool
    hardware: str
    duration: float                   # session s
    wall_seconds: float
    turns: list[TurnResult]
    summary: dict
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Collector:
    """on_output: keeps what the engine said (from any thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.speech: list[list[float | None]] = []          # [start, end] VAD spans
        self.ends: dict[int, TurnEnd] = {}
        self.tokens: dict[int, list[str]] = {}
        self.chunks: dict[int, list[AudioOut]] = {}
        self.metrics: dict[int, TurnMetrics] = {}
        self.interrupts: list[Interrupt] = []

    def __call__(self, f: Frame) -> None:
        with self.lock:
            if isinstance(f, SpeechStart):
                self.speech.append([f.t, None])
            elif isinstance(f, SpeechEnd) and self.speech and self.speech[-1][1] is None:
                self.speech[-1][1] = f.t
            elif isinstance(f, TurnEnd):
                self.ends[f.turn] = f
            elif isinstance(f, TextOut):
                self.tokens.setdefault(f.turn, []).append(f.token)
            elif isinstance(f, AudioOut):
                self.chunks.setdefault(f.turn, []).append(f)
            elif isinstance(f, TurnDone):
                self.metrics[f.metrics.turn] = f.metrics
            elif isinstance(f, Interrupt):
                self.interrupts.append(f)


def replay(session_dir, out_dir, agent: Agent, *, realtime: bool = False,
           options: EngineOptions | None = None, progress: bool = True,
           record=None) -> ReplayReport:
    """Replays `session_dir` through an Engine running `agent`; writes the outputs to
    `out_dir` (see the module doc) and, with `record=DIR`, records the replay as a new
    session. `options.threaded` follows `realtime`."""
    from .recorder import EVENT_TYPES, Recorder
    session = load_session(session_dir)
    if not len(session.audio):
        raise SessionError(f"{session.root} has no audio (mic.wav) to replay: the engine "
                           "follows the microphone's clock")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    (out / "turns").mkdir(parents=True, exist_ok=True)
    for old in (out / "turns").glob("turn_*.wav"):
        old.unlink()
    options = replace(options or EngineOptions(), threaded=realtime)
    recorder = None
    if record is not None:
        recorder = Recorder(SessionWriter(record, meta={
            "source": "replay", "replay_of": str(session.root), "model": agent.name}))
        for ev in session.events:  # ground truth travels with the recording
            if ev["type"] not in EVENT_TYPES:
                recorder.write_event(ev["t"], **{k: v for k, v in ev.items() if k != "t"})
    col = _Collector()
    engine = Engine(agent, col, options, recorder=recorder)
    wall0 = time.perf_counter()
    skipped: list[str] = []
    try:
        _feed(engine, session, realtime, progress, skipped)
        engine.wait_idle()
    finally:
        engine.close()
    wall = time.perf_counter() - wall0

    sr = agent.output_rate
    turns, track = _timeline(col, session, sr, out)
    match_questions(turns, session.events)
    report = ReplayReport(
        session=str(session.root), out_dir=str(out), model=agent.name,
        mode=options.generation.mode, realtime=realtime, hardware=hardware(agent),
        duration=session.duration, wall_seconds=wall, turns=turns,
        summary=summarize(turns, session), warnings=list(session.warnings) + skipped)
    _write_wav(out / "agent.wav", track, sr)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    text = format_summary(report)
    (out / "summary.txt").write_text(text + "\n")
    if progress:
        print(text)
    plot_timeline(out / "timeline.png", session, col.speech, turns, track, sr)
    return report


def _feed(engine: Engine, s: Session, realtime: bool, progress: bool,
          skipped: list[str]) -> None:
    """Mic audio in 20 ms chunks with each frame pushed once the clock reaches its t; a
    frame that does not decode is skipped (one warning, in `skipped`, for all of them)."""
    from tqdm import tqdm
    audio, frames = s.audio, s.frames
    wall0 = time.perf_counter()

    def pace(t: float) -> None:
        if realtime and (d := wall0 + t - time.perf_counter()) > 0:
            time.sleep(d)

    def push_frames_until(t: float, fi: int) -> int:
        while fi < len(frames) and frames[fi].t <= t:
            pace(frames[fi].t)
            try:
                engine.push_frame(s.read_frame(fi), t=frames[fi].t)
            except SessionError:
                bad.append(frames[fi].file)
            fi += 1
        return fi

    bad: list[str] = []

    fi, done = 0, 0.0
    with tqdm(total=round(s.duration, 2), unit="s", disable=not progress, leave=False,
              desc="replay", bar_format="{desc} {bar} {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]") as bar:
        for a in range(0, len(audio), CHUNK):
            fi = push_frames_until(a / SAMPLE_RATE, fi)
            b = min(a + CHUNK, len(audio))
            pace(b / SAMPLE_RATE)
            engine.push_audio(audio[a:b])
            if b / SAMPLE_RATE - done >= 0.25 or b == len(audio):
                bar.update(round(b / SAMPLE_RATE - done, 2))
                done = round(b / SAMPLE_RATE, 2)
        push_frames_until(float("inf"), fi)    # frames after the end of the audio
    if bad:
        skipped.append(f"{len(bad)} frame(s) skipped: JPEG not decodable: {', '.join(bad[:3])}"
                       + (", ..." if len(bad) > 3 else ""))


def _timeline(col: _Collector, s: Session, sr: int, out: Path):
    """Per-turn results and the agent's voice on the session timeline (codec rate).

    A reply plays chunk after chunk from its first chunk's t (a chunk never starts before its
    t, nor before the previous one ended); it is cut at an Interrupt of its turn and at the
    next end-of-turn decision (the engine cancels the old reply there)."""
    ids = sorted(set(col.ends) | set(col.metrics))
    placed, results = {}, []
    for k in ids:
        pos, segs = 0, []
        for c in col.chunks.get(k, []):
            pos = max(int(round(c.t * sr)), pos)
            segs.append((pos, c.pcm))
            pos += len(c.pcm)
        placed[k] = segs
    total = int(round(s.duration * sr))
    ends = [segs[-1][0] + len(segs[-1][1]) for segs in placed.values() if segs]
    track = np.zeros(max([total, *ends]), np.float32)
    for i, k in enumerate(ids):
        segs, m, te = placed[k], col.metrics.get(k), col.ends.get(k)
        cuts = [f.t for f in col.interrupts if f.turn == k]
        if i + 1 < len(ids) and ids[i + 1] in col.ends:
            cuts.append(col.ends[ids[i + 1]].t)
        natural = segs[-1][0] + len(segs[-1][1]) if segs else None
        cut = min((int(round(t * sr)) for t in cuts
                   if natural is not None and t * sr < natural), default=None)
        played = 0
        for pos, pcm in segs:
            n = len(pcm) if cut is None else max(0, min(len(pcm), cut - pos))
            track[pos:pos + n] = pcm[:n]
            played += n
        audio_file = None
        if segs:
            audio_file = f"turns/turn_{k:03d}.wav"
            _write_wav(out / audio_file, np.concatenate([p for _, p in segs]), sr)
        tokens = col.tokens.get(k, [])
        interrupted = cut is not None or bool(m and m.interrupted)
        stop_at = cut / sr if cut is not None else min(
            (f.t for f in col.interrupts if f.turn == k), default=None)
        results.append(TurnResult(
            turn=k,
            speech_start=m.speech_start if m else te.speech_start,
            speech_end=m.speech_end if m else te.speech_end,
            decision=m.decision if m else te.t,
            first_audio=m.first_audio if m else None,
            response_latency=m.response_latency if m else None,
            compute_latency=m.compute_latency if m else None,
            generation_rtf=m.generation_rtf if m else None,
            reply_seconds=sum(len(p) for _, p in segs) / sr, played_seconds=played / sr,
            text=m.text if m else "".join(tokens), tokens=tokens, audio_file=audio_file,
            interrupted=interrupted,
            interrupted_at=stop_at if interrupted else None,
            backbone_forwards=m.backbone_forwards if m else 0,
            end_of_turn_wait=(m.decision - m.speech_end) if m else te.t - te.speech_end,
            turn_end=te.reason if te else m.turn_end if m else None,
            discarded_starts=te.discarded if te else m.discarded_starts if m else 0))
    return results, track


def _write_wav(path: Path, x: np.ndarray, sr: int) -> None:
    import soundfile as sf
    sf.write(str(path), np.clip(x, -1.0, 1.0), sr, subtype="PCM_16", format="WAV")
