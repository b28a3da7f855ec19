"""Typed frames flowing through the session engine. Every frame carries `t`, seconds on the
session clock (the count of microphone samples received / 16 kHz)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Frame:
    t: float


# --- input --------------------------------------------------------------------------------------
@dataclass
class AudioIn(Frame):
    pcm: np.ndarray = field(repr=False)   # (n,) float32 mono 16 kHz


@dataclass
class VideoIn(Frame):
    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8 BGR


@dataclass
class Control(Frame):
    kind: str                              # "interrupt" | "reset"


# --- derived --------------------------------------------------------------------------------------
@dataclass
class SpeechStart(Frame):
    pass


@dataclass
class SpeechEnd(Frame):
    pass


@dataclass
class TurnEnd(Frame):
    """The end-of-turn decision (at `t`) for user speech over [speech_start, speech_end]."""
    turn: int
    speech_start: float
    speech_end: float


@dataclass
class Interrupt(Frame):
    turn: int
    reason: str                            # "barge-in" | "control" | "reset"


# --- output ---------------------------------------------------------------------------------------
@dataclass
class TextOut(Frame):
    turn: int
    token: str
    text: str                              # reply text so far


@dataclass
class AudioOut(Frame):
    turn: int
    pcm: np.ndarray = field(repr=False)    # (n,) float32 mono at sample_rate
    sample_rate: int = 0
    offset: int = 0                        # first sample's index within the reply


# The latency words, the same on every page and report (bench, replay, eval, browser, live):
# response latency = end-of-turn wait + compute latency (+ transport and playback in a browser).
LATENCY_WORDS = {
    "response_latency": ("response latency",
                         "end of the user's speech to the first reply sound heard"),
    "end_of_turn_wait": ("end-of-turn wait",
                         "end of the user's speech to the end-of-turn decision (the silence the "
                         "agent waits for before it answers)"),
    "compute_latency": ("compute latency",
                        "end-of-turn decision to the first reply audio ready"),
}


def latency_legend(sep: str = "; ") -> str:
    """'response latency = end of the user's speech to ...; end-of-turn wait = ...; ...'"""
    return sep.join(f"{name} = {text}" for name, text in LATENCY_WORDS.values())


@dataclass
class TurnMetrics:
    turn: int
    speech_start: float                    # session s
    speech_end: float                      # session s: end of the user's speech
    decision: float                        # session s: end-of-turn decision
    first_audio: float | None              # session s: first reply audio sample out
    response_latency: float | None         # first_audio - speech_end (LATENCY_WORDS)
    compute_latency: float | None          # first chunk ready - decision (wall s)
    generation_rtf: float | None           # reply audio s / generation wall s
    reply_seconds: float
    text: str
    interrupted: bool
    backbone_forwards: int
    mode: str
    end_of_turn_wait: float | None = None  # decision - speech_end

    def __post_init__(self):
        if self.end_of_turn_wait is None:
            self.end_of_turn_wait = self.decision - self.speech_end

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TurnDone(Frame):
    metrics: TurnMetrics


OUTPUT_FRAMES = (SpeechStart, SpeechEnd, TurnEnd, Interrupt, TextOut, AudioOut, TurnDone)
