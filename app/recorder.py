"""Recorder: the engine's first processor; writes a session directory as the session runs.

    Engine(agent, on_output, options, recorder=Recorder(SessionWriter(OUT)))

Inputs (AudioIn, VideoIn, Control) are written as they enter the pipeline: microphone audio
to mic.wav, camera frames as JPEGs, controls as events. The engine hands every output frame
to `record_output`, which writes what happened (speech_start, speech_end, turn_end,
reply_text, interrupt, turn_done with the turn's metrics) to events.jsonl. Reply audio
itself is not stored (a replay regenerates it). The SessionWriter underneath is append-only
and crash-safe, so a killed process leaves a replayable directory.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable

from vision.camera import encode_jpeg

from .engine import Processor
from .frames import (AudioIn, Control, Frame, Interrupt, SpeechEnd, SpeechStart, TextOut,
                     TurnDone, TurnEnd, VideoIn)
from .session import SessionWriter

log = logging.getLogger("tandem.recorder")

# event types the recorder writes (a replay recorded again writes fresh ones)
EVENT_TYPES = ("control", "speech_start", "speech_end", "turn_end", "reply_text",
               "interrupt", "turn_done")


class Recorder(Processor):
    """Records a session's inputs and events through `writer`. Thread-safe: inputs come from
    the capture thread, outputs possibly from the engine's reply thread."""

    def __init__(self, writer: SessionWriter, jpeg_quality: int = 85):
        if not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
        self.writer, self.jpeg_quality = writer, int(jpeg_quality)
        self._lock = threading.Lock()
        self._closed = False
        self.frames = 0                       # camera frames written
        self.output_error: Exception | None = None  # first failure while writing an event

    @property
    def seconds(self) -> float:
        """Seconds of microphone audio recorded."""
        return self.writer.audio_seconds

    # --- inputs (the capture thread): failures raise, the caller must know -----------------
    def process(self, frame: Frame) -> Iterable[Frame]:
        if isinstance(frame, AudioIn):
            self.writer.write_audio(frame.pcm)
        elif isinstance(frame, VideoIn):
            self.writer.write_frame(frame.t, jpeg=encode_jpeg(frame.image, self.jpeg_quality))
            self.frames += 1
        elif isinstance(frame, Control):
            self.writer.write_event(frame.t, "control", kind=frame.kind)
        yield frame

    # --- outputs (any thread): a failing disk must not take replies down -------------------
    def record_output(self, frame: Frame) -> None:
        """Write the event for one output frame (AudioOut writes nothing)."""
        ev = _event(frame)
        if ev is None:
            return
        with self._lock:
            if self._closed:
                return
            try:
                self.writer.write_event(frame.t, ev.pop("type"), **ev)
            except Exception as e:  # noqa: BLE001  logged once, kept in output_error
                if self.output_error is None:
                    log.error("recording events failed: %s", e)
                    self.output_error = e

    def write_event(self, t: float, type: str, **fields) -> None:
        """Record an extra event (e.g. ground truth copied from a replayed session)."""
        with self._lock:
            if not self._closed:
                self.writer.write_event(t, type, **fields)

    def close(self) -> None:
        """Finalise the session directory (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.writer.close()


def _event(frame: Frame) -> dict | None:
    if isinstance(frame, SpeechStart):
        return {"type": "speech_start"}
    if isinstance(frame, SpeechEnd):
        return {"type": "speech_end"}
    if isinstance(frame, TurnEnd):
        return {"type": "turn_end", "turn": frame.turn, "speech_start": frame.speech_start,
                "speech_end": frame.speech_end, "reason": frame.reason,
                "discarded": frame.discarded}
    if isinstance(frame, TextOut):
        return {"type": "reply_text", "turn": frame.turn, "token": frame.token}
    if isinstance(frame, Interrupt):
        return {"type": "interrupt", "turn": frame.turn, "reason": frame.reason}
    if isinstance(frame, TurnDone):
        return {"type": "turn_done", "metrics": frame.metrics.to_dict()}
    return None
