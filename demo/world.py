"""The demo world (`docs/DEMO_WORLD.md`) as data, sampling and rendering; pure and seeded.

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
from dataclasses import asdict, dataclass, replace

import numpy as np

from demo.hesitation import (HESITATION_PAUSE, Hesitation, hesitant_speech, n_boundaries,
                              pause_span, speech_only)
from speech.constants import CONTEXT_SECONDS, DEMO_FRAME_SIZE, SAMPLE_RATE
from demo.room import ROOM_PROB, Room, reverberate, sample_room
from demo.voices import (HELDOUT_VARIANTS, HELDOUT_VOICE_NAMES, USER_PITCH, USER_WPM,  # noqa: F401
                         check_mode, sample_voice as _sample_voice, voice_pool)
from speech.tts import FestivalVoice, FliteVoice, PiperVoice, Voice, synthesize_cached, voice_from_dict

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
SPEECH_DBFS = (-30.0, -18.0)
NOISE_BELOW_SPEECH_DB = (27.0, 45.0)     # background noise, >= 25 dB below speech
SPEECH_NOISE_BELOW_DB = (32.0, 45.0)     # light noise on the question speech
EVENT_MARGIN = 0.1
AA_GROW = 1.4                      # px: cv2's anti-aliased fill overshoot

# --- held out of train/val (test split only) ---------------------------------------------
HELDOUT_TRIPLES = (("green", "triangle", "right"), ("red", "square", "left"),
                   ("blue", "circle", "middle"), ("yellow", "triangle", "left"))
# held-out question voices (HELDOUT_VOICE_NAMES, HELDOUT_VARIANTS): demo/voices.py


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
    voice: Voice | FliteVoice | FestivalVoice | PiperVoice   # who asks (demo/voices.py)
    t_q0: float                    # question speech starts
    t_q1: float                    # question speech ends
    t_next: float                  # end of the answer silence (next scene)
    speech_dbfs: float             # RMS of the question speech
    speech_noise_db: float | None  # light noise on the speech, dB below it; None = none
    hesitation: Hesitation | None = None   # a pause inside the question (demo/hesitation.py)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["voice"] = self.voice.to_dict()              # flite and Piper voices name their engine
        return _drop_no_hesitation(d)

    @classmethod
    def from_dict(cls, d):
        return cls(Scene.from_dict(d["scene"]), float(d["t_scene"]),
                   Question.from_dict(d["question"]), voice_from_dict(d["voice"]),
                   float(d["t_q0"]), float(d["t_q1"]), float(d["t_next"]),
                   float(d["speech_dbfs"]), d["speech_noise_db"],
                   Hesitation.from_dict(d.get("hesitation")))


def _drop_no_hesitation(turn: dict) -> dict:
    """Turns without a hesitation serialise as before hesitations existed."""
    if turn.get("hesitation", 0) is None:
        del turn["hesitation"]
    return turn


@dataclass(frozen=True)
class SessionSpec(_Dict):
    turns: tuple[TurnSpec, ...]
    duration: float                # s
    noise_level: float | None      # background noise RMS dBFS; None = no noise
    seed: int                      # seeds render_audio's noise
    room: Room | None = None       # the questions' reverberation (demo/room.py); None = dry

    def to_dict(self) -> dict:
        d = asdict(self)
        d["turns"] = [t.to_dict() for t in self.turns]
        if d["room"] is None:                          # dry sessions serialise as before rooms
            del d["room"]
        return d

    @classmethod
    def from_dict(cls, d):
        return cls(tuple(TurnSpec.from_dict(t) for t in d["turns"]), float(d["duration"]),
                   d["noise_level"], int(d["seed"]), Room.from_dict(d.get("room")))


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
# the page's versions: v1 phrases (rounds 1-11), v2 sentences (demo/replies.py; the shipped
# model's since round 12), whose questions differ only here
REPLY_VERSIONS = ("v1", "v2")
QUESTION_WORDING_V2 = {"What shape is on the middle?": "What shape is in the middle?"}
SOUND_QTYPES = frozenset({"pitch", "which_object", "where_sound", "color_of_sound",
                          "did_make_sound"})        # need beeps; count_beeps does not
YES_NO_QTYPES = ("is_there", "did_make_sound")


def worded(question: Question, version: str) -> Question:
    """The question as the page's `version` words it (v2: "What shape is in the middle?")."""
    if version == "v2" and question.text in QUESTION_WORDING_V2:
        return replace(question, text=QUESTION_WORDING_V2[question.text])
    return question


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
    uses held-out voices and forces a held-out triple into a scene with `heldout_combo_prob`.
    `hesitation_prob`: the share of questions spoken with a pause (0: none, version 1).
    `voices`: who asks, one of demo.voices.QUESTION_VOICES ("piper" only for test).
    `version`: the page's version of the questions' wording (REPLY_VERSIONS; v2: "What shape
    is in the middle?")."""
    split: str                     # train | val | test
    heldout_combo_prob: float = 0.5
    hesitation_prob: float = 0.0
    voices: str = "espeak"
    version: str = "v1"

    def __post_init__(self):
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {self.split!r}")
        if not 0.0 <= self.heldout_combo_prob <= 1.0:
            raise ValueError(f"heldout_combo_prob must be in [0, 1], got "
                             f"{self.heldout_combo_prob}")
        if not 0.0 <= self.hesitation_prob <= 1.0:
            raise ValueError(f"hesitation_prob must be in [0, 1] (0.25 is the page's version 2),"
                             f" got {self.hesitation_prob}")
        check_mode(self.voices, self.split)
        if self.version not in REPLY_VERSIONS:
            raise ValueError(f"version must be one of {', '.join(REPLY_VERSIONS)} (the page's "
                             f"versions), got {self.version!r}")

    @property
    def heldout(self) -> bool:
        return self.split == "test"


def sample_voice(rng, rules: SplitRules) -> Voice | FliteVoice | FestivalVoice | PiperVoice:
    """A question voice for `rules`' split (demo/voices.py)."""
    return _sample_voice(rng, rules.heldout, rules.voices)


# --- sampling ----------------------------------------------------------------------------
def _ms(rng, lo: float, hi: float) -> int:
    """Uniform whole milliseconds in [lo, hi] seconds."""
    return int(rng.integers(round(lo * 1000), round(hi * 1000) + 1))


def _sample_background(rng) -> Background:
    kind = ("flat", "vgrad", "hgrad", "noise")[rng.integers(4)]
    c0 = _rgb(rng.integers(0, BG_MAX + 1, 3))
    c1 = _rgb(rng.integers(0, BG_MAX + 1, 3)) if kind.endswith("grad") else c0
    amp = int(rng.integers(3, 13)) if kind == "noise" else 0
    return Background(kind, c0, c1, int(rng.integers(2**31)), amp)


def _sample_objects(rng, rules: SplitRules) -> tuple[WorldObject, ...]:
    n = int(rng.integers(1, 4))
    for _ in range(1000):
        slots = sorted(int(s) for s in rng.choice(3, n, replace=False))
        trip = [(list(COLORS)[rng.integers(4)], SHAPES[rng.integers(3)], SLOTS[s])
                for s in slots]
        if rules.heldout and rng.random() < rules.heldout_combo_prob:
            forced = HELDOUT_TRIPLES[rng.integers(len(HELDOUT_TRIPLES))]
            trip = [x for x in trip if x[2] != forced[2]]
            if len(trip) == n:
                trip.pop(int(rng.integers(n)))
            trip = sorted(trip + [forced], key=lambda x: SLOTS.index(x[2]))
        elif not rules.heldout and any(x in HELDOUT_TRIPLES for x in trip):
            continue
        break
    objs = []
    for color, shape, slot in trip:
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1,
                                                              3), 0, 255)
        size = round(float(rng.uniform(*SIZE_PX)), 1)
        y = round(REF_H * (0.5 + float(rng.uniform(-Y_JITTER, Y_JITTER))), 1)
        objs.append(WorldObject(shape, color, slot, _rgb(rgb), size, y))
    return tuple(objs)


def _run_ms(rng, n: int) -> tuple[list[tuple[int, int]], int]:
    """A run of n beep-like events: [(offset_ms, dur_ms)], total length in ms."""
    out, t = [], 0
    for i in range(n):
        t += _ms(rng, *BEEP_GAP) if i else 0
        d = _ms(rng, *BEEP_DUR)
        out.append((t, d))
        t += d
    return out, t


def _sample_turn(rng, rules, voice, t_scene_ms, base_dbfs, synth, sample_rate,
                 room: Room | None = None) -> TurnSpec:
    qtype = QTYPE_IDS[rng.integers(len(QTYPE_IDS))]
    target = ("yes.", "no.")[rng.integers(2)] if qtype in YES_NO_QTYPES else None
    for _ in range(10_000):
        objects = _sample_objects(rng, rules)
        if qtype in SOUND_QTYPES:
            sound = True
        else:
            sound = rng.random() >= (0.25 if qtype == "count_beeps" else 0.4)
        n_beeps = int(rng.integers(1, 4)) if sound else 0
        sound_slot = objects[rng.integers(len(objects))].slot if sound else None
        freq = round(float(rng.uniform(*(HIGH_HZ if rng.random() < 0.5 else LOW_HZ))), 1)
        level = round(float(rng.uniform(*BEEP_DBFS)), 2)
        draft = Scene(_sample_background(rng), objects,
                      tuple(Beep(0.0, 0.25, freq, level) for _ in range(n_beeps)), (),
                      sound_slot)
        cands = [q for q in candidate_questions(draft, qtype)
                 if target is None or q.answer == target]
        if cands:
            break
    else:
        raise AssertionError(f"no scene found for {qtype} -> {target}")
    question = worded(_pick_balanced(rng, cands), rules.version)
    pause = None                   # (words before it, ms); rng untouched when prob is 0
    if rules.hesitation_prob > 0 and rng.random() < rules.hesitation_prob:
        pause = (int(rng.integers(1, n_boundaries(question.text) + 1)),
                 _ms(rng, *HESITATION_PAUSE))
    if pause is None:
        audio, span = synth(question.text, voice, sample_rate), None
    else:
        audio, *span = hesitant_speech(question.text, voice, pause[0],
                                       round(pause[1] * sample_rate / 1000), synth, sample_rate)
    q0_ms = t_scene_ms + _ms(rng, *SCENE_SECONDS)
    t_q0 = q0_ms / 1000
    t_q1 = t_q0 + len(audio) / sample_rate
    hesitation = None if span is None else Hesitation(
        pause[0], t_q0 + span[0] / sample_rate, t_q0 + span[1] / sample_rate)
    lo_ms = max(t_scene_ms, int(np.ceil((t_q1 - CONTEXT_SECONDS) * 1000))) + \
        round(EVENT_MARGIN * 1000)
    hi_ms = q0_ms - round(EVENT_MARGIN * 1000)
    others = [o.slot for o in objects if o.slot != sound_slot]
    distract = bool(others) and rng.random() < (0.4 if sound else 0.25)
    d_slot = others[rng.integers(len(others))] if distract else None
    n_d = int(rng.integers(1, 4)) if distract else 0
    for attempt in range(400):
        b_run, b_len = _run_ms(rng, n_beeps)
        d_run, d_len = _run_ms(rng, n_d if attempt < 200 else 0)
        sep = _ms(rng, 0.15, 0.6) if b_run and d_run else 0
        total = b_len + sep + d_len
        if total == 0 or total <= hi_ms - lo_ms:
            break
    else:
        raise RuntimeError(f"question {question.text!r} by {voice} lasts "
                           f"{len(audio) / sample_rate:.2f} s: too long for its beeps to fit "
                           f"the {CONTEXT_SECONDS} s context; use a faster voice")
    start = lo_ms + int(rng.integers(0, max(0, hi_ms - lo_ms - total) + 1))
    b_start, d_start = (start, start + b_len + sep)
    if rng.random() < 0.5 and b_run and d_run:
        b_start, d_start = start + d_len + sep, start
    beeps = tuple(Beep((b_start + o) / 1000, d / 1000, freq, level) for o, d in b_run)
    pulses = []
    for slot, run, s0 in ((sound_slot, b_run, b_start), (d_slot, d_run, d_start)):
        scale = round(float(rng.uniform(*PULSE_SCALE)), 3)
        bright = int(rng.integers(PULSE_BRIGHTEN[0], PULSE_BRIGHTEN[1] + 1))
        pulses += [Pulse(slot, (s0 + o) / 1000, d / 1000, scale, bright) for o, d in run]
    scene = Scene(draft.background, objects, beeps,
                  tuple(sorted(pulses, key=lambda p: p.t0)), sound_slot)
    audio = reverberate(audio, room, sample_rate)      # as render_audio will hear it
    rms = float(np.sqrt(np.mean(np.square(speech_only(audio, span), dtype=np.float64))))
    limit = 20 * np.log10(0.9 * rms / float(np.max(np.abs(audio))))   # peak at 0.9
    dbfs = float(np.clip(base_dbfs + rng.uniform(-1.5, 1.5), *SPEECH_DBFS))
    speech_noise = None if rng.random() < 0.3 else round(float(rng.uniform(
        *SPEECH_NOISE_BELOW_DB)), 2)
    t_next = (int(np.ceil(t_q1 * 1000)) + _ms(rng, *ANSWER_SILENCE)) / 1000
    return TurnSpec(scene, t_scene_ms / 1000, question, voice, t_q0, t_q1, t_next,
                    round(min(dbfs, limit), 2), speech_noise, hesitation)


def sample_session(rng, n_turns: int, split_rules: SplitRules, synth=None,
                   sample_rate: int = SAMPLE_RATE) -> SessionSpec:
    """Sample one session of `n_turns` turns, synthesising each question to time it.

    `synth(text, voice, sample_rate) -> float32` defaults to the memoised espeak-ng
    `synthesize_cached`; `question_audio(spec)` gets the same audio back for rendering.
    """
    if n_turns < 1:
        raise ValueError(f"n_turns must be >= 1, got {n_turns}")
    synth = synth or synthesize_cached
    seed = int(rng.integers(2**31))
    voice = sample_voice(rng, split_rules)
    voice_per_turn = rng.random() < 0.15          # some sessions: several speakers
    base_dbfs = float(rng.uniform(*SPEECH_DBFS))
    room = None                    # "mix" train/val: some sessions in a room (rng untouched else)
    if split_rules.voices == "mix" and not split_rules.heldout and rng.random() < ROOM_PROB:
        room = sample_room(rng)
    t_ms, turns = _ms(rng, 0.2, 1.0), []
    for _ in range(n_turns):
        v = sample_voice(rng, split_rules) if voice_per_turn else voice
        turn = _sample_turn(rng, split_rules, v, t_ms, base_dbfs, synth, sample_rate, room)
        turns.append(turn)
        t_ms = round(turn.t_next * 1000)
    noise = None if rng.random() < 0.25 else round(
        min(t.speech_dbfs for t in turns) - float(rng.uniform(*NOISE_BELOW_SPEECH_DB)), 2)
    return SessionSpec(tuple(turns), turns[-1].t_next, noise, seed, room)


def question_audio(spec: SessionSpec, synth=None,
                   sample_rate: int = SAMPLE_RATE) -> list[np.ndarray]:
    """The question speech of each turn (as `sample_session` synthesised it; a hesitation's
    pause as zeros), dry: `render_audio` adds the session's room."""
    synth = synth or synthesize_cached
    out = []
    for t in spec.turns:
        span = pause_span(t, sample_rate)
        out.append(synth(t.question.text, t.voice, sample_rate) if span is None else
                   hesitant_speech(t.question.text, t.voice, t.hesitation.words,
                                   span[1] - span[0], synth, sample_rate)[0])
    return out


# --- live scenes (no question: a person asks) -----------------------------------------------
LIVE_SOUND_PROB = 0.6              # a live scene beeps (else it is silent)
LIVE_DISTRACT_PROB = 0.3           # another object pulses silently after the beeps


def sample_scene(rng, t_events: float, rules: SplitRules = SplitRules("train")) -> Scene:
    """A scene to show live, where a person asks the questions: background and 1-3 objects
    as `sample_session` draws them; with LIVE_SOUND_PROB a run of 1-3 beeps from one object
    (its pulses with them) from absolute time `t_events`; maybe a silent distractor pulse
    after the run. Times in whole milliseconds."""
    objects = _sample_objects(rng, rules)
    background = _sample_background(rng)
    start = round(t_events * 1000)
    sound = rng.random() < LIVE_SOUND_PROB
    sound_slot = objects[rng.integers(len(objects))].slot if sound else None
    b_run, b_len = _run_ms(rng, int(rng.integers(1, 4)) if sound else 0)
    freq = round(float(rng.uniform(*(HIGH_HZ if rng.random() < 0.5 else LOW_HZ))), 1)
    level = round(float(rng.uniform(*BEEP_DBFS)), 2)
    beeps = tuple(Beep((start + o) / 1000, d / 1000, freq, level) for o, d in b_run)
    others = [o.slot for o in objects if o.slot != sound_slot]
    d_slot = (others[rng.integers(len(others))]
              if others and rng.random() < LIVE_DISTRACT_PROB else None)
    d_run, _ = _run_ms(rng, int(rng.integers(1, 4)) if d_slot else 0)
    d_start = start + b_len + (_ms(rng, 0.15, 0.6) if b_run else 0)
    pulses = []
    for slot, run, s0 in ((sound_slot, b_run, start), (d_slot, d_run, d_start)):
        scale = round(float(rng.uniform(*PULSE_SCALE)), 3)
        bright = int(rng.integers(PULSE_BRIGHTEN[0], PULSE_BRIGHTEN[1] + 1))
        pulses += [Pulse(slot, (s0 + o) / 1000, d / 1000, scale, bright) for o, d in run]
    return Scene(background, objects, beeps, tuple(sorted(pulses, key=lambda p: p.t0)),
                 sound_slot)


def shift_scene(scene: Scene, dt: float) -> Scene:
    """`scene` with its beeps and pulses `dt` seconds later."""
    return Scene(scene.background, scene.objects,
                 tuple(Beep(round(b.t0 + dt, 6), b.dur, b.freq, b.level_dbfs)
                       for b in scene.beeps),
                 tuple(Pulse(p.slot, round(p.t0 + dt, 6), p.dur, p.scale, p.brighten)
                       for p in scene.pulses), scene.sound_slot)


def describe_scene(scene: Scene) -> str:
    """One line a person reads: "a red circle on the left and a blue square in the middle;
    the red circle beeps twice, high." """
    where = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
    objs = [f"a {o.color} {o.shape} {where[o.slot]}" for o in scene.objects]
    text = objs[0] if len(objs) == 1 else ", ".join(objs[:-1]) + " and " + objs[-1]
    snd = scene.sounding_object
    if snd is None or not scene.beeps:
        return text + "; silent."
    n = ("once", "twice", "three times")[min(len(scene.beeps), 3) - 1]
    pitch = "high" if scene.beeps[0].freq >= 1000 else "low"
    return f"{text}; the {snd.color} {snd.shape} beeps {n}, {pitch}."


def example_questions(scene: Scene, n: int, rng=None) -> list[Question]:
    """Up to `n` questions whose answers are defined for `scene`, one per question type
    (types drawn at random), alternating hearing (audio, audio-visual) and seeing (visual)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    heard, seen = [], []
    for qtype in QTYPE_IDS:
        cands = candidate_questions(scene, qtype)
        if cands:
            q = cands[rng.integers(len(cands))]
            (seen if q.type_group == "visual" else heard).append(q)
    heard = [heard[i] for i in rng.permutation(len(heard))]
    seen = [seen[i] for i in rng.permutation(len(seen))]
    mixed = [q for pair in zip(heard, seen) for q in pair]
    k = min(len(heard), len(seen))
    return (mixed + heard[k:] + seen[k:])[:n]


# --- rendering ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _background_image(bg: Background, w: int, h: int) -> np.ndarray:
    c0, c1 = np.array(bg.color0[::-1], np.float32), np.array(bg.color1[::-1], np.float32)
    img = np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    if bg.kind == "vgrad":
        a = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        img = c0 * (1 - a) + c1 * a + np.zeros((1, w, 1), np.float32)
    elif bg.kind == "hgrad":
        a = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
        img = c0 * (1 - a) + c1 * a + np.zeros((h, 1, 1), np.float32)
    elif bg.kind == "noise":
        img = img + np.random.default_rng(bg.noise_seed).integers(
            -bg.noise_amp, bg.noise_amp + 1, (h, w, 3))
    elif bg.kind != "flat":
        raise ValueError(f"unknown background kind {bg.kind!r}")
    out = np.clip(np.rint(img), 0, BG_MAX).astype(np.uint8)
    out.setflags(write=False)
    return out


def _draw(img, shape: str, cx: float, cy: float, d: float, bgr) -> None:
    import cv2
    s = 16                                            # cv2 fixed-point shift of 4 bits
    d = max(d - AA_GROW, 1.0)                         # cv2 fills ~1.4 px wider than asked
    if shape == "circle":
        cv2.circle(img, (round(cx * s), round(cy * s)), round(d / 2 * s), bgr, -1,
                   cv2.LINE_AA, 4)
        return
    if shape == "square":
        pts = [(cx - d / 2, cy - d / 2), (cx + d / 2, cy - d / 2), (cx + d / 2, cy + d / 2),
               (cx - d / 2, cy + d / 2)]
    elif shape == "triangle":                         # equilateral, pointing up
        hh = d * np.sqrt(3) / 2
        pts = [(cx, cy - hh / 2), (cx + d / 2, cy + hh / 2), (cx - d / 2, cy + hh / 2)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cv2.fillPoly(img, [np.round(np.array(pts) * s).astype(np.int32)], bgr, cv2.LINE_AA, 4)


def active_pulse(scene: Scene, slot: str, t: float) -> Pulse | None:
    """The pulse of the object in `slot` at time t (t0 <= t < t0 + dur), if any."""
    return next((p for p in scene.pulses if p.slot == slot and p.t0 <= t < p.t0 + p.dur),
                None)


def scene_at(spec: SessionSpec, t: float) -> tuple[int, Scene | None]:
    """(turn index, scene) on screen at t; (-1, None) before the first scene."""
    i = bisect.bisect_right([tr.t_scene for tr in spec.turns], t) - 1
    return i, (spec.turns[i].scene if i >= 0 else None)


def render_frame(world, t: float, size: tuple[int, int] = DEMO_FRAME_SIZE) -> np.ndarray:
    """The camera frame at time t of a `SessionSpec` or a `Scene`: BGR uint8 (H, W, 3)."""
    w, h = int(size[0]), int(size[1])
    if isinstance(world, SessionSpec):
        _, scene = scene_at(world, t)
        if scene is None:                              # before the first scene: empty stage
            return _background_image(world.turns[0].scene.background, w, h).copy()
    elif isinstance(world, Scene):
        scene = world
    else:
        raise TypeError(f"render_frame takes a SessionSpec or a Scene, got "
                        f"{type(world).__name__}")
    img = _background_image(scene.background, w, h).copy()
    k = min(w / REF_W, h / REF_H)
    for o in scene.objects:
        p = active_pulse(scene, o.slot, t)
        rgb = np.clip(np.array(o.rgb) + (p.brighten if p else 0), 0, 255)
        _draw(img, o.shape, SLOT_X[o.slot] * w, o.y_px / REF_H * h,
              o.size_px * k * (p.scale if p else 1.0), tuple(int(c) for c in rgb[::-1]))
    return img


def beep_wave(beep: Beep, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One beep: sine at `freq`, peak `level_dbfs`, 10 ms linear fades; float64 (T,)."""
    m = int(round(beep.dur * sample_rate))
    x = np.sin(2 * np.pi * beep.freq * np.arange(m) / sample_rate) * 10 ** (
        beep.level_dbfs / 20)
    nf = int(round(BEEP_FADE * sample_rate))
    ramp = np.arange(1, nf + 1) / nf
    x[:nf] *= ramp
    x[m - nf:] *= ramp[::-1]
    return x


def _colored_noise(rng, n: int, rms: float, sample_rate: int) -> np.ndarray:
    alpha = float(rng.uniform(0.0, 1.5))              # 0 white .. 1 pink .. 1.5 reddish
    m = 1 << max(0, n - 1).bit_length()              # power of two: fast FFT
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.maximum(np.fft.rfftfreq(m, 1 / sample_rate), 50.0)
    x = np.fft.irfft(spec * f ** (-alpha / 2), m)[:n]
    return x * (rms / max(float(np.sqrt(np.mean(x * x))), 1e-12))


def render_audio(spec: SessionSpec, question_audio: list[np.ndarray],
                 sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The microphone signal of a session: beeps + question speech (at its t_q0, in the
    session's room if any, scaled to `speech_dbfs`, light noise on it) + background noise. float32 (T,) in [-1, 1]."""
    if len(question_audio) != len(spec.turns):
        raise ValueError(f"question_audio has {len(question_audio)} utterances for "
                         f"{len(spec.turns)} turns; pass question_audio(spec)")
    n = int(round(spec.duration * sample_rate))
    out = np.zeros(n, np.float64)
    for i, (turn, q) in enumerate(zip(spec.turns, question_audio)):
        for b in turn.scene.beeps:
            x, a = beep_wave(b, sample_rate), int(round(b.t0 * sample_rate))
            out[a:a + len(x)] += x[:max(0, n - a)]
        q = reverberate(q, spec.room, sample_rate)      # float64; dry when room is None
        want = (turn.t_q1 - turn.t_q0) * sample_rate
        if q.ndim != 1 or abs(len(q) - want) > 1:
            raise ValueError(f"question_audio[{i}] has shape {q.shape}, the spec expects "
                             f"{want:.0f} samples; synthesise it with the turn's voice at "
                             f"{sample_rate} Hz (question_audio(spec, sample_rate=...))")
        span = pause_span(turn, sample_rate)           # a hesitation: silent, not counted
        sp = speech_only(q, span)
        rms = float(np.sqrt(np.mean(sp * sp)))
        seg = q * (10 ** (turn.speech_dbfs / 20) / max(rms, 1e-12))
        if turn.speech_noise_db is not None:
            rng = np.random.default_rng([spec.seed, 2, i])
            noise = rng.standard_normal(len(q)) * 10 ** (
                (turn.speech_dbfs - turn.speech_noise_db) / 20)
            if span is not None:
                noise[span[0]:span[1]] = 0.0
            seg = seg + noise
        a = int(round(turn.t_q0 * sample_rate))
        out[a:a + len(seg)] += seg[:max(0, n - a)]
    if spec.noise_level is not None:
        out += _colored_noise(np.random.default_rng([spec.seed, 1]), n,
                              10 ** (spec.noise_level / 20), sample_rate)
    return np.clip(out, -1.0, 1.0).astype(np.float32)
