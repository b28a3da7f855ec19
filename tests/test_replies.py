"""Version-2 sentence replies and the slot rule (docs/DEMO_WORLD.md)."""
import numpy as np
import pytest

from demo import world as W
from demo.replies import sentence, slot_match, slots


@pytest.mark.parametrize("qtype, question, answer, expected", [
    ("what_color", "What color is the square?", "green.", "The square is green."),
    ("shape_at", "What shape is in the middle?", "a circle.", "It is a circle."),
    ("count_objects", "How many objects are there?", "one.", "There is one object."),
    ("count_objects", "How many objects are there?", "three.", "There are three objects."),
    ("is_there", "Is there a red circle?", "yes.", "Yes, there is."),
    ("is_there", "Is there a red circle?", "no.", "No, there isn't."),
    ("where_is", "Where is the blue triangle?", "on the middle.", "It is in the middle."),
    ("where_is", "Where is the blue triangle?", "on the left.", "It is on the left."),
    ("count_beeps", "How many beeps did you hear?", "none.", "I heard no beeps."),
    ("count_beeps", "How many beeps did you hear?", "one.", "I heard one beep."),
    ("count_beeps", "How many beeps did you hear?", "two.", "I heard two beeps."),
    ("pitch", "Was the sound high or low?", "high.", "The sound was high."),
    ("which_object", "Which object made the sound?", "the red square.", "The red square made the sound."),
    ("where_sound", "Where did the sound come from?", "the right.", "It came from the right."),
    ("color_of_sound", "What color is the object that beeped?", "yellow.", "It was yellow."),
    ("did_make_sound", "Did the green circle make a sound?", "no.", "No, it didn't."),
])
def test_sentence_templates(qtype, question, answer, expected):
    assert sentence(qtype, question, answer) == expected
    assert slot_match(expected, answer, qtype)          # the sentence carries the answer


def _scenes(rng, n):
    """Scenes with random objects and, in most, a run of beeps from one of them."""
    for _ in range(n):
        objs = W._sample_objects(rng, W.SplitRules("train"))
        k = int(rng.integers(0, 4))
        beeps = tuple(W.Beep(0.5 * i, 0.25, 450.0 if rng.random() < 0.5 else 1600.0, -15.0)
                      for i in range(k))
        snd = objs[int(rng.integers(len(objs)))].slot if k else None
        yield W.Scene(W._sample_background(rng), objs, beeps, (), snd)


ANSWERS = {  # every version-1 answer of each question type
    "what_color": {f"{c}." for c in W.COLORS}, "color_of_sound": {f"{c}." for c in W.COLORS},
    "shape_at": {f"a {s}." for s in W.SHAPES},
    "count_objects": {"one.", "two.", "three."}, "count_beeps": {"none.", "one.", "two.", "three."},
    "is_there": {"yes.", "no."}, "did_make_sound": {"yes.", "no."},
    "where_is": {f"on the {p}." for p in W.SLOTS}, "where_sound": {f"the {p}." for p in W.SLOTS},
    "pitch": {"high.", "low."},
    "which_object": {f"the {c} {s}." for c in W.COLORS for s in W.SHAPES},
}


def test_every_question_has_a_sentence_that_scores_right_and_only_right():
    n = 0
    for scene in _scenes(np.random.default_rng(0), 200):
        for qtype in W.QTYPE_IDS:
            cands = W.candidate_questions(scene, qtype)
            for q in cands:
                s = sentence(qtype, q.text, q.answer)
                assert slot_match(s, q.answer, qtype) and slot_match(s, s, qtype), (q, s)
                for other in ANSWERS[qtype] - {q.answer}:    # every other answer of the type
                    assert not slot_match(sentence(qtype, q.text, other), s, qtype), (q, other)
                    assert not slot_match(other, q.answer, qtype), (q, other)
                n += 1
    assert n > 1000


def test_digits_read_as_number_words():
    assert slot_match("I heard 2 beeps.", "two.", "count_beeps")
    assert slot_match("There are 3 objects", "three.", "count_objects")
    assert not slot_match("I heard 3 beeps.", "two.", "count_beeps")
    assert slot_match("I heard 0 beeps.", "none.", "count_beeps")


def test_no_is_a_count_in_a_count_and_a_yes_no_elsewhere():
    assert slots("I heard no beeps.", "count_beeps") == {"number": {"none"}}
    assert slots("No, there isn't.", "is_there") == {"yes_no": {"no"}}
    assert slot_match("I heard no beeps.", "none.", "count_beeps")
    assert not slot_match("No.", "yes.", "is_there")
    assert not slot_match("I heard one beep.", "none.", "count_beeps")   # "one" is a count here
    assert slot_match("The one on the left.", "on the left.", "where_is")  # and not a slot here


def test_another_value_of_the_same_slot_is_wrong():
    assert not slot_match("The square is green, or blue.", "green.", "what_color")
    assert not slot_match("It is on the left or the right.", "on the left.", "where_is")
    assert not slot_match("Yes and no.", "yes.", "did_make_sound")
    assert slot_match("The square is green.", "green.", "what_color")    # other slots are free
    assert not slot_match("green.", "The square is green.", "what_color")  # shape is missing


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown question type"):
        slot_match("green.", "green.", "colour")
    with pytest.raises(ValueError, match="names no slot value"):
        slot_match("green.", "hello.", "what_color")
