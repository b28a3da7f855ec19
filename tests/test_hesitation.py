"""Hesitations (docs/DEMO_WORLD.md version 2): a pause of 0.3-1.0 s at a word boundary, silent
in the rendered audio, recorded in the spec and the session events; off by default."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from demo import world as W
from demo.hesitation import Hesitation, split_words
from speech.constants import END_OF_TURN_SILENCE, SAMPLE_RATE
from speech.tts import synthesize_cached

SR = SAMPLE_RATE


@pytest.fixture(scope="module")
def hesitant():
    return W.sample_session(np.random.default_rng(11), 3,
                            W.SplitRules("train", hesitation_prob=1.0))


def _db(x) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-20)


def test_the_pause_lies_at_a_word_boundary_and_the_question_ends_with_its_last_word(hesitant):
    for t in hesitant.turns:
        h, words = t.hesitation, t.question.text.split()
        assert h is not None and 1 <= h.words < len(words)
        assert 0.3 - 1e-9 <= h.t1 - h.t0 <= 1.0 + 1e-9
        head, tail = split_words(t.question.text, h.words)
        assert head.split() + tail.split() == words
        n_head = len(synthesize_cached(head, t.voice, SR))        # the first part ends there
        n_tail = len(synthesize_cached(tail, t.voice, SR))
        assert abs(h.t0 - (t.t_q0 + n_head / SR)) < 1e-9
        assert abs(t.t_q1 - (h.t1 + n_tail / SR)) < 1e-9           # end of the last word
        assert t.t_next - t.t_q1 >= 2.5
    assert W.SessionSpec.from_dict(json.loads(json.dumps(hesitant.to_dict()))) == hesitant


def test_the_pause_is_silent_in_the_rendered_audio(hesitant):
    quiet = replace(hesitant, noise_level=None)
    audio = W.render_audio(quiet, W.question_audio(quiet))
    noisy = replace(hesitant, noise_level=min(t.speech_dbfs for t in hesitant.turns) - 30.0)
    noisy_audio = W.render_audio(noisy, W.question_audio(noisy))
    for t in hesitant.turns:
        h = t.hesitation
        a, b = int(np.ceil(h.t0 * SR)), int(h.t1 * SR)
        assert np.all(audio[a:b] == 0.0)                           # no speech, no speech noise
        assert np.abs(audio[a - 400:a]).max() > 0 and np.abs(audio[b:b + 400]).max() > 0
        assert abs(_db(noisy_audio[a:b]) - noisy.noise_level) < 3.0   # background noise only
        speech = np.concatenate([audio[int(t.t_q0 * SR):a], audio[b:int(t.t_q1 * SR)]])
        assert abs(_db(speech) - t.speech_dbfs) < 1.0              # level counts speech only


def test_off_by_default_nothing_changes():
    a = W.sample_session(np.random.default_rng(4), 2, W.SplitRules("val"))
    b = W.sample_session(np.random.default_rng(4), 2, W.SplitRules("val", hesitation_prob=0.0))
    assert a == b and all(t.hesitation is None for t in a.turns)
    assert "hesitation" not in json.dumps(a.to_dict())           # same JSON as version 1
    q = W.question_audio(a)
    assert [len(x) for x in q] == [round((t.t_q1 - t.t_q0) * SR) for t in a.turns]
    c = W.sample_session(np.random.default_rng(4), 2, W.SplitRules("val", hesitation_prob=1.0))
    assert c != a and all(t.hesitation is not None for t in c.turns)


def test_bad_hesitation_settings_say_what_to_do():
    with pytest.raises(ValueError, match="hesitation_prob must be in"):
        W.SplitRules("train", hesitation_prob=1.5)
    with pytest.raises(ValueError, match="pick 1 .. 3"):
        split_words("How many objects there?", 4)
    with pytest.raises(ValueError, match="t0 < t1"):
        Hesitation(2, 3.0, 3.0)
    from lab.data import DataOptions
    with pytest.raises(ValueError, match="hesitation_prob"):
        DataOptions(hesitation_prob=-0.1)


def test_sessions_carry_the_pause_and_the_vad_hears_two_utterances(hesitant, tmp_path):
    from app.session import load_session
    from lab.data import write_session
    from speech.vad import StreamingVAD, VADOptions
    t0 = hesitant.turns[0]
    long_pause = replace(t0, hesitation=replace(t0.hesitation, t1=t0.hesitation.t0 + 0.9))
    shift = long_pause.hesitation.t1 - t0.hesitation.t1
    turn = replace(long_pause, t_q1=t0.t_q1 + shift, t_next=t0.t_next + shift)
    spec = W.SessionSpec((turn,), turn.t_next, None, hesitant.seed)
    audio = W.render_audio(spec, W.question_audio(spec))
    write_session(tmp_path / "s", spec, audio, {"world": "demo"})
    ses = load_session(tmp_path / "s")
    (q,) = [e for e in ses.events if e["type"] == "question"]
    h = turn.hesitation
    assert (q["t"], q["t_end"], q["pause"], q["pause_after_words"]) == \
        (turn.t_q0, turn.t_q1, [h.t0, h.t1], h.words)
    assert W.SessionSpec.from_dict(ses.meta["spec"]) == spec

    def utterances(silence_s):
        vad = StreamingVAD(VADOptions(min_silence_ms=silence_s * 1000))
        ev = vad.feed(audio) + vad.finish()
        return [(s.t, e.t) for s, e in zip(ev[::2], ev[1::2])]
    cut = utterances(END_OF_TURN_SILENCE)                # today's engine: cut off in the pause
    assert len(cut) == 2 and h.t0 - 0.2 < cut[0][1] < h.t1 + 0.1 < cut[1][1] + 0.1
    whole = utterances(1.2)                              # a patient one: one question
    assert len(whole) == 1 and whole[0][0] < h.t0 and whole[0][1] > turn.t_q1 - 0.2


def test_run_py_data_hesitations_reach_shards_and_sessions(tmp_path):
    import run
    from app.session import load_session
    from lab.data import TrainShards, main
    args = run.build_parser().parse_args(["data", "--hesitations", "0.25"])
    assert args.hesitations == 0.25
    m = main(tmp_path, n_train_sessions=1, n_val_sessions=1, n_test_sessions=0,
             turns_per_session=1, workers=1, progress=False, n_codec_sentences=1,
             n_codec_eval=0, hesitation_prob=1.0)
    assert m["options"]["hesitation_prob"] == 1.0
    (spec,) = TrainShards(tmp_path).specs
    assert spec.turns[0].hesitation is not None
    ses = load_session(tmp_path / "val" / "00000")
    (q,) = [e for e in ses.events if e["type"] == "question"]
    h = W.SessionSpec.from_dict(ses.meta["spec"]).turns[0].hesitation
    assert q["pause"] == [h.t0, h.t1] and q["t"] < h.t0 < h.t1 < q["t_end"]


def test_training_leaves_the_pause_out_as_the_engine_does(hesitant):
    """The trainset cuts a hesitation from the question where the engine would: from about the
    VAD's speech end to QUESTION_PAD before its late restart; fluent turns draw nothing."""
    from lab.trainset import QUESTION_END_JITTER, QUESTION_START_JITTER, question_gaps
    from speech.constants import QUESTION_PAD
    rng = np.random.default_rng(0)
    for t in hesitant.turns:
        (a, b), = question_gaps(rng, t)
        h = t.hesitation
        assert h.t0 + QUESTION_END_JITTER[0] <= a <= h.t0 + QUESTION_END_JITTER[1]
        assert h.t1 - QUESTION_PAD + QUESTION_START_JITTER[0] <= b <= h.t1 - QUESTION_PAD + QUESTION_START_JITTER[1]
    fluent = W.sample_session(np.random.default_rng(11), 2, W.SplitRules("train"))
    state = rng.bit_generator.state
    assert all(question_gaps(rng, t) == [] for t in fluent.turns)
    assert rng.bit_generator.state == state


def test_encoder_pretraining_hears_the_question_without_its_pause(hesitant):
    """The audio encoder's pretraining (lab.pretrain) cuts a hesitation out of the question as
    the engine and the feature cache do: what is left is the question's speech, no long silence."""
    from lab.pretrain import question_audio
    quiet = replace(hesitant, noise_level=None)
    mic = W.render_audio(quiet, W.question_audio(quiet))
    for t in hesitant.turns:
        q = question_audio(mic, np.random.default_rng(0), t)
        silent = np.flatnonzero(np.abs(q) > 0)
        longest = np.diff(silent).max() / SR                       # longest stretch of zeros
        spoken = t.t_q1 - t.t_q0 - (t.hesitation.t1 - t.hesitation.t0)
        assert longest < 0.2 and abs(len(q) / SR - spoken) < 0.35, (longest, len(q) / SR, spoken)
