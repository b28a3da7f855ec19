"""Replies in sentences (DEMO_WORLD.md version 2) and the slot rule that scores any reply.

Version 1 answers are bare phrases ("green.", "the left."); version 2 says the same in a
short sentence ("The square is green.", "It came from the left."). `sentence` turns a
question and its version-1 answer into the version-2 sentence, so one sampler serves both.

The slot rule: a reply is right when it carries every slot word of the expected answer
(color, shape, position, number, yes/no, high/low), digits read as number words, and no other
value of the same slot. "no" is a number in a count ("I heard no beeps.") and a yes/no
otherwise. It scores version-1 phrases, version-2 sentences and a recogniser's transcript alike.
"""
from __future__ import annotations

import re

from .world import COLORS, QTYPES, REPLY_VERSIONS, SHAPES, SLOTS

COUNT_QTYPES = frozenset({"count_objects", "count_beeps"})
NUMBERS = ("none", "one", "two", "three")
SLOT_VALUES = {
    "color": frozenset(COLORS),
    "shape": frozenset(SHAPES),
    "position": frozenset(SLOTS),
    "number": frozenset(NUMBERS),
    "yes_no": frozenset({"yes", "no"}),
    "pitch": frozenset({"high", "low"}),
}
_DIGITS = {"0": "none", "1": "one", "2": "two", "3": "three"}
_COUNT_ALIASES = {"no": "none", "zero": "none"}
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-case words, digits as number words: "I heard 2 beeps." -> [i, heard, two, beeps]."""
    return [_DIGITS.get(w, w) for w in _WORD.findall(text.lower())]


def slots(text: str, qtype: str) -> dict[str, set[str]]:
    """Slot -> the values `text` names, read as an answer to a `qtype` question."""
    out: dict[str, set[str]] = {}
    counting = qtype in COUNT_QTYPES
    for w in words(text):
        if counting and w in _COUNT_ALIASES:
            w = _COUNT_ALIASES[w]
        for slot, values in SLOT_VALUES.items():
            if slot == "number" and not counting:
                continue            # "one" only counts in a count; elsewhere it is not a slot
            if slot == "yes_no" and counting:
                continue
            if w in values:
                out.setdefault(slot, set()).add(w)
    return out


def slot_match(reply: str, expected: str, qtype: str) -> bool:
    """True when `reply` carries each slot value of `expected` and no other value of that slot."""
    if qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}; one of {tuple(QTYPES)}")
    want, got = slots(expected, qtype), slots(reply, qtype)
    if not want:
        raise ValueError(f"expected answer {expected!r} names no slot value for {qtype}")
    return all(got.get(slot) == values for slot, values in want.items())


def slot_rule(reply: str, expected: str, qtype) -> bool | None:
    """`slot_match` where the rule applies (a question type of the world and an expected answer
    naming a slot value); None where it does not."""
    if qtype not in QTYPES or not slots(expected, qtype):
        return None
    return slot_match(reply, expected, qtype)


def answer_right(reply: str, expected: str, qtype: str | None) -> bool:
    """Whether `reply` answers right: the slot rule (a version-1 phrase and a version-2 sentence
    alike: "The square is green." answers "green."); where it does not apply, the texts equal
    (lower case, no punctuation, numbers as words). The eval's and the replay report's rule."""
    from speech.recognizer import normalize_text
    right = slot_rule(reply, expected, qtype)
    return right if right is not None else normalize_text(reply) == normalize_text(expected)


def _the(words_: list[str], values) -> str:
    found = [w for w in words_ if w in values]
    assert len(found) == 1, (words_, values)
    return found[0]


def sentence(qtype: str, question: str, answer: str) -> str:
    """The version-2 reply to `question` (of `qtype`) whose version-1 answer is `answer`."""
    q, a = words(question), words(answer)
    if qtype == "what_color":
        return f"The {_the(q, SHAPES)} is {_the(a, COLORS)}."
    if qtype == "shape_at":
        return f"It is a {_the(a, SHAPES)}."
    if qtype in COUNT_QTYPES:
        n = _COUNT_ALIASES.get(a[0], a[0])
        if qtype == "count_objects":
            return "There is one object." if n == "one" else f"There are {n} objects."
        return {"none": "I heard no beeps.", "one": "I heard one beep."}.get(n, f"I heard {n} beeps.")
    if qtype == "is_there":
        return "Yes, there is." if a == ["yes"] else "No, there isn't."
    if qtype == "did_make_sound":
        return "Yes, it did." if a == ["yes"] else "No, it didn't."
    if qtype == "where_is":
        p = _the(a, SLOTS)
        return "It is in the middle." if p == "middle" else f"It is on the {p}."
    if qtype == "pitch":
        return f"The sound was {_the(a, ('high', 'low'))}."
    if qtype == "which_object":
        return f"The {_the(a, COLORS)} {_the(a, SHAPES)} made the sound."
    if qtype == "where_sound":
        return f"It came from the {_the(a, SLOTS)}."
    if qtype == "color_of_sound":
        return f"It was {_the(a, COLORS)}."
    raise ValueError(f"unknown question type {qtype!r}; one of {tuple(QTYPES)}")


# --- reply versions --------------------------------------------------------------------------
# REPLY_VERSIONS (demo/world.py): DEMO_WORLD.md's phrases and sentences (the shipped model's)
REPLY_HELP = "v1: short phrases ('green.'), rounds 1-11; v2: sentences ('The square is green.'), the shipped model's"


def check_version(version: str) -> str:
    """`version` when it is one of REPLY_VERSIONS; else a ValueError saying what to pass."""
    if version not in REPLY_VERSIONS:
        raise ValueError(f"the reply version must be one of {', '.join(REPLY_VERSIONS)} "
                         f"({REPLY_HELP}), got {version!r}")
    return version


def reply_text(qtype: str, question: str, answer: str, version: str) -> str:
    """The agent's reply in `version`: the version-1 `answer` itself, or its sentence."""
    return answer if check_version(version) == "v1" else sentence(qtype, question, answer)


def _answers_of(qtype: str) -> tuple[str, ...]:
    """Every version-1 answer a `qtype` question may have (DEMO_WORLD.md's table)."""
    cs = [f"{c} {s}" for c in COLORS for s in SHAPES]
    return {"what_color": [f"{c}." for c in COLORS], "color_of_sound": [f"{c}." for c in COLORS],
            "shape_at": [f"a {s}." for s in SHAPES], "where_is": [f"on the {p}." for p in SLOTS],
            "count_objects": [f"{n}." for n in NUMBERS[1:]],
            "count_beeps": [f"{n}." for n in NUMBERS], "pitch": ["high.", "low."],
            "is_there": ["yes.", "no."], "did_make_sound": ["yes.", "no."],
            "which_object": [f"the {x}." for x in cs], "where_sound": [f"the {p}." for p in SLOTS],
            }[qtype]


def all_reply_texts(version: str) -> tuple[str, ...]:
    """Every reply text the world can ask for in `version`, sorted (v1: `all_answer_texts`)."""
    out = set()
    for qtype, (_, template, _) in QTYPES.items():
        questions = {template.format(c=c, s=s, p=p) for c in COLORS for s in SHAPES for p in SLOTS}
        out |= {reply_text(qtype, q, a, version) for q in questions for a in _answers_of(qtype)}
    return tuple(sorted(out))
