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


TURN_END_REASONS = ("predictor", "max_silence", "silence")


@dataclass
class TurnEnd(Frame):
    """The end-of-turn decision (at `t`) for user speech over [speech_start, speech_end].
    reason: what ended the turn: "predictor" (the end-of-turn predictor said complete at a
    short pause), "max_silence" (it never did: the longest silence ran out) or "silence"
    (the fixed END_OF_TURN_SILENCE rule, no predictor). discarded: preemptive replies started
    and thrown away in this turn (the user went on speaking after a pause)."""
    turn: int
    speech_start: float
    speech_end: float
    reason: str = "silence"
    probability: float | None = None       # the predictor's P(complete) at the last pause
    discarded: int = 0
    pauses: tuple = ()                     # (t0, t1) silences inside the turn (it went on)


@dataclass
class TurnCandidate(Frame):
    """Engine-internal (never sent to on_output): a short pause may end the turn; the reply
    processor starts a reply preemptively and holds its output until the TurnEnd."""
    turn: int
    speech_start: float
    speech_end: float
    probability: float | None = None
    pauses: tuple = ()


@dataclass
class TurnResumed(Frame):
    """Engine-internal: the user spoke again before the candidate was committed; the held
    reply is dropped silently (no output, no Interrupt) and the turn goes on."""
    turn: int


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
    turn_end: str = "silence"              # what ended the turn (TurnEnd.reason)
    discarded_starts: int = 0              # preemptive replies discarded in this turn

    def __post_init__(self):
        if self.end_of_turn_wait is None:
            self.end_of_turn_wait = self.decision - self.speech_end

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TurnDone(Frame):
    metrics: TurnMetrics


OUTPUT_FRAMES = (SpeechStart, SpeechEnd, TurnEnd, Interrupt, TextOut, AudioOut, TurnDone)
