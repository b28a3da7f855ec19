"""The demo world (`shared/DEMO_WORLD.md`) as data, sampling and rendering; pure and seeded.

A `SessionSpec` says everything about one rendered session: per turn a scene (background,
objects, beeps, pulses), the spoken question (text, voice, real start/end times taken from
the synthesised audio) and the answer. `render_frame` and `render_audio` turn a spec into
pixels and samples; they draw no random numbers except from `SessionSpec.seed`.

Choices made inside the page's ranges (documented here, checked by tests/test_world.py):
- All times are absolute session seconds (beeps and pulses too); scene-side times are whole
  milliseconds, question ends are sample-exact.
- Sizes and y positions are stored for the reference 320x240 frame and scale with
  min(W / 320, H / 240); slot x centres are fractions of the width. Triangles are
  equilateral, centred on their bounding box.
- Before the first turn's scene starts, frames show that scene's background, empty.
- Beep levels are peak dBFS of the sine; speech and noise levels are RMS dBFS.
- A sound always comes from an on-screen object; a distractor may pulse silently, also in
  a scene with no sound (so a pulse alone never means a beep).
- Events (beeps, pulses) lie in [max(scene start, question end - 6 s) + 0.1 s,
  question start - 0.1 s].
"""
from __future__ import annotations

import bisect
import functools
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from speech.constants import CONTEXT_SECONDS, DEMO_FRAME_SIZE, SAMPLE_RATE
from speech.tts import Voice, list_english_voices, list_variants, synthesize_cached

# --- the page's constants and ranges ----------------------------------------------------
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230),
          "yellow": (230, 210, 40)}                       # RGB
SHAPES = ("circle", "square", "triangle")
SLOTS = ("left", "middle", "right")
SLOT_X = {"left": 0.2, "middle": 0.5, "right": 0.8}       # fraction of the width
NUMBER_WORDS = ("none", "one", "two", "three")
REF_W, REF_H = DEMO_FRAME_SIZE
COLOR_JITTER = 25
SIZE_PX = (50.0, 80.0)
Y_JITTER = 0.08                    # of the height
BG_MAX = 80                        # background channels 0..80
PULSE_SCALE = (1.25, 1.35)
PULSE_BRIGHTEN = (10, 40)
BEEP_DUR = (0.20, 0.30)
BEEP_GAP = (0.20, 0.35)
BEEP_FADE = 0.010
LOW_HZ, HIGH_HZ = (400.0, 500.0), (1500.0, 1800.0)
BEEP_DBFS = (-20.0, -10.0)
SCENE_SECONDS = (2.5, 4.0)         # scene start -> question start
ANSWER_SILENCE = (2.5, 3.5)        # question end -> next scene
USER_WPM, USER_PITCH = (130, 200), (25, 75)
SPEECH_DBFS = (-30.0, -18.0)
NOISE_BELOW_SPEECH_DB = (27.0, 45.0)     # background noise, >= 25 dB below speech
SPEECH_NOISE_BELOW_DB = (32.0, 45.0)     # light noise on the question speech
EVENT_MARGIN = 0.1

# --- held out of train/val (test split only) ---------------------------------------------
HELDOUT_TRIPLES = (("green", "triangle", "right"), ("red", "square", "left"),
                   ("blue", "circle", "middle"), ("yellow", "triangle", "left"))
HELDOUT_VOICE_NAMES = ("en-029", "en-gb-scotland")
HELDOUT_VARIANTS = ("Annie", "edward2", "f4", "iven2", "klatt4", "m6", "robosoft3", "steph3")


# --- data --------------------------------------------------------------------------------
class _Dict:
    def to_dict(self) -> dict:
        return asdict(self)


def _rgb(v) -> tuple[int, int, int]:
    return tuple(int(c) for c in v)


@dataclass(frozen=True)
class WorldObject(_Dict):
    shape: str
    color: str                     # color name
    slot: str                      # left | middle | right
    rgb: tuple[int, int, int]      # jittered RGB
    size_px: float                 # across, at 320x240
    y_px: float                    # centre y, at 320x240

    @classmethod
    def from_dict(cls, d):
        return cls(d["shape"], d["color"], d["slot"], _rgb(d["rgb"]), float(d["size_px"]),
                   float(d["y_px"]))


@dataclass(frozen=True)
class Beep(_Dict):
    t0: float                      # s, absolute
    dur: float                     # s
    freq: float                    # Hz
    level_dbfs: float              # peak

    @classmethod
    def from_dict(cls, d):
        return cls(float(d["t0"]), float(d["dur"]), float(d["freq"]), float(d["level_dbfs"]))


@dataclass(frozen=True)
class Pulse(_Dict):
    slot: str
    t0: float                      # s, absolute
    dur: float
    scale: float                   # size factor while pulsing
    brighten: int                  # added to each channel while pulsing

    @classmethod
    def from_dict(cls, d):
        return cls(d["slot"], float(d["t0"]), float(d["dur"]), float(d["scale"]),
                   int(d["brighten"]))


@dataclass(frozen=True)
class Background(_Dict):
    kind: str                      # flat | vgrad | hgrad | noise
    color0: tuple[int, int, int]   # RGB; flat/noise base, gradient top/left
    color1: tuple[int, int, int]   # RGB; gradient bottom/right
    noise_seed: int
    noise_amp: int                 # noise: +- per channel

    @classmethod
    def from_dict(cls, d):
        return cls(d["kind"], _rgb(d["color0"]), _rgb(d["color1"]), int(d["noise_seed"]),
                   int(d["noise_amp"]))


@dataclass(frozen=True)
class Scene(_Dict):
    background: Background
    objects: tuple[WorldObject, ...]
    beeps: tuple[Beep, ...]
    pulses: tuple[Pulse, ...]
    sound_slot: str | None         # the object that beeps; None for a silent scene

    @property
    def sounding_object(self) -> WorldObject | None:
        return next((o for o in self.objects if o.slot == self.sound_slot), None)

    @classmethod
    def from_dict(cls, d):
        return cls(Background.from_dict(d["background"]),
                   tuple(WorldObject.from_dict(o) for o in d["objects"]),
                   tuple(Beep.from_dict(b) for b in d["beeps"]),
                   tuple(Pulse.from_dict(p) for p in d["pulses"]), d["sound_slot"])


@dataclass(frozen=True)
class Question(_Dict):
    qtype: str
    text: str
    answer: str
    type_group: str                # visual | audio | audio-visual

    @classmethod
    def from_dict(cls, d):
        return cls(d["qtype"], d["text"], d["answer"], d["type_group"])


@dataclass(frozen=True)
class TurnSpec(_Dict):
    scene: Scene
    t_scene: float                 # scene appears
    question: Question
    voice: Voice
    t_q0: float                    # question speech starts
    t_q1: float                    # question speech ends
    t_next: float                  # end of the answer silence (next scene)
    speech_dbfs: float             # RMS of the question speech
    speech_noise_db: float | None  # light noise on the speech, dB below it; None = none

    @classmethod
    def from_dict(cls, d):
        return cls(Scene.from_dict(d["scene"]), float(d["t_scene"]),
                   Question.from_dict(d["question"]), Voice.from_dict(d["voice"]),
                   float(d["t_q0"]), float(d["t_q1"]), float(d["t_next"]),
                   float(d["speech_dbfs"]), d["speech_noise_db"])


@dataclass(frozen=True)
class SessionSpec(_Dict):
    turns: tuple[TurnSpec, ...]
    duration: float                # s
    noise_level: float | None      # background noise RMS dBFS; None = no noise
    seed: int                      # seeds render_audio's noise

    @classmethod
    def from_dict(cls, d):
        return cls(tuple(TurnSpec.from_dict(t) for t in d["turns"]), float(d["duration"]),
                   d["noise_level"], int(d["seed"]))


# --- questions ---------------------------------------------------------------------------
# id: (group, question template, answer template) -- exactly DEMO_WORLD.md's table.
QTYPES = {
    "what_color": ("visual", "What color is the {s}?", "{c}."),
    "shape_at": ("visual", "What shape is on the {p}?", "a {s}."),
    "count_objects": ("visual", "How many objects are there?", "{n}."),
    "is_there": ("visual", "Is there a {c} {s}?", "yes. / no."),
    "where_is": ("visual", "Where is the {c} {s}?", "on the {p}."),
    "count_beeps": ("audio", "How many beeps did you hear?", "{n}. / none."),
    "pitch": ("audio", "Was the sound high or low?", "high. / low."),
    "which_object": ("audio-visual", "Which object made the sound?", "the {c} {s}."),
    "where_sound": ("audio-visual", "Where did the sound come from?", "the {p}."),
    "color_of_sound": ("audio-visual", "What color is the object that beeped?", "{c}."),
    "did_make_sound": ("audio-visual", "Did the {c} {s} make a sound?", "yes. / no."),
}
QTYPE_IDS = tuple(QTYPES)
SOUND_QTYPES = frozenset({"pitch", "which_object", "where_sound", "color_of_sound",
                          "did_make_sound"})        # need beeps; count_beeps does not
YES_NO_QTYPES = ("is_there", "did_make_sound")


def _q(qtype: str, answer: str, **kw) -> Question:
    group, template, _ = QTYPES[qtype]
    return Question(qtype, template.format(**kw), answer, group)


def candidate_questions(scene: Scene, qtype: str) -> list[Question]:
    """Every question of `qtype` whose answer is defined for `scene` (maybe none)."""
    objs, snd = scene.objects, scene.sounding_object
    pairs = Counter((o.color, o.shape) for o in objs)
    shapes = Counter(o.shape for o in objs)
    unique = [o for o in objs if pairs[(o.color, o.shape)] == 1]
    if qtype in SOUND_QTYPES and (snd is None or not scene.beeps):
        return []
    if qtype == "what_color":
        return [_q(qtype, f"{o.color}.", s=o.shape) for o in objs if shapes[o.shape] == 1]
    if qtype == "shape_at":
        return [_q(qtype, f"a {o.shape}.", p=o.slot) for o in objs]
    if qtype == "count_objects":
        return [_q(qtype, f"{NUMBER_WORDS[len(objs)]}.")]
    if qtype == "is_there":
        return [_q(qtype, "yes." if pairs[(c, s)] else "no.", c=c, s=s)
                for c in COLORS for s in SHAPES]
    if qtype == "where_is":
        return [_q(qtype, f"on the {o.slot}.", c=o.color, s=o.shape) for o in unique]
    if qtype == "count_beeps":
        return [_q(qtype, f"{NUMBER_WORDS[len(scene.beeps)]}.")]
    if qtype == "pitch":
        return [_q(qtype, "high." if scene.beeps[0].freq >= 1000 else "low.")]
    if qtype == "which_object":
        return [_q(qtype, f"the {snd.color} {snd.shape}.")] if snd in unique else []
    if qtype == "where_sound":
        return [_q(qtype, f"the {snd.slot}.")]
    if qtype == "color_of_sound":
        return [_q(qtype, f"{snd.color}.")]
    if qtype == "did_make_sound":
        return [_q(qtype, "yes." if o is snd else "no.", c=o.color, s=o.shape)
                for o in unique]
    raise ValueError(f"unknown question type {qtype!r}; one of {QTYPE_IDS}")


def all_answer_texts() -> tuple[str, ...]:
    """Every reply text the world can ask for, sorted."""
    out = {f"{c}." for c in COLORS} | {f"a {s}." for s in SHAPES}
    out |= {f"{w}." for w in NUMBER_WORDS} | {"yes.", "no.", "high.", "low."}
    out |= {f"on the {p}." for p in SLOTS} | {f"the {p}." for p in SLOTS}
    out |= {f"the {c} {s}." for c in COLORS for s in SHAPES}
    return tuple(sorted(out))


def _pick_balanced(rng, cands: list[Question]) -> Question:
    answers = sorted({q.answer for q in cands})      # uniform over answers, then questions
    a = answers[rng.integers(len(answers))]
    same = [q for q in cands if q.answer == a]
    return same[rng.integers(len(same))]


# --- splits ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitRules:
    """What a split may use: train/val never see held-out voices or triples; test always
    uses held-out voices and forces a held-out triple into a scene with `heldout_combo_prob`."""
    split: str                     # train | val | test
    heldout_combo_prob: float = 0.5

    def __post_init__(self):
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {self.split!r}")
        if not 0.0 <= self.heldout_combo_prob <= 1.0:
            raise ValueError(f"heldout_combo_prob must be in [0, 1], got "
                             f"{self.heldout_combo_prob}")

    @property
    def heldout(self) -> bool:
        return self.split == "test"


@functools.lru_cache(maxsize=None)
def voice_pool(heldout: bool) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """(voice names, variants) a split draws from; None = espeak-ng's plain voice."""
    names, variants = list_english_voices(), list_variants()
    if heldout:
        pool = (tuple(n for n in names if n in HELDOUT_VOICE_NAMES),
                tuple(v for v in variants if v in HELDOUT_VARIANTS))
    else:
        pool = (tuple(n for n in names if n not in HELDOUT_VOICE_NAMES),
                (None,) + tuple(v for v in variants if v not in HELDOUT_VARIANTS))
    if not pool[0] or not pool[1]:
        raise RuntimeError(f"espeak-ng lacks the voices needed (names {names}, variants "
                           f"{variants}); install Debian's espeak-ng (apt-get install "
                           f"espeak-ng)")
    return pool


def sample_voice(rng, rules: SplitRules) -> Voice:
    names, variants = voice_pool(rules.heldout)
    return Voice(names[rng.integers(len(names))], variants[rng.integers(len(variants))],
                 int(rng.integers(USER_WPM[0], USER_WPM[1] + 1)),
                 int(rng.integers(USER_PITCH[0], USER_PITCH[1] + 1)))

