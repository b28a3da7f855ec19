"""Spoken replies judged (lab/spoken_eval.py): word error rate, the slot rule on transcripts,
DNSMOS on real speech vs noise and against speechmos's own scoring."""
import sys
import types

import numpy as np
import pytest

from lab.spoken_eval import (Dnsmos, WordErrors, heard_right, judge_reply, pooled_rate,
                             spoken_summary, word_errors)


def test_word_errors_count_each_kind_of_edit():
    ref = "The square is green."
    assert word_errors(ref, "the square is green") == WordErrors(0, 0, 0, 4)
    assert word_errors(ref, "The circle is green.") == WordErrors(1, 0, 0, 4)      # substitution
    assert word_errors(ref, "The square is very green.") == WordErrors(0, 1, 0, 4)  # insertion
    assert word_errors(ref, "square is green") == WordErrors(0, 0, 1, 4)           # deletion
    assert word_errors(ref, "Thank you.") == WordErrors(2, 0, 2, 4)
    assert word_errors(ref, "Thank you.").rate == 1.0
    assert word_errors("yes.", "Yes, yes, yes!").rate == 2.0      # insertions: WER is not capped
    # digits are read as words, on either side
    assert word_errors("There are 2 objects.", "there are two objects").errors == 0
    assert word_errors("I heard none.", "I heard 0.").errors == 0
    # "0" reads "none": a different word from "no" (the slot rule accepts either in a count)
    assert word_errors("I heard no beeps.", "I heard 0 beeps.") == WordErrors(1, 0, 0, 4)
    # an empty reference: nothing to get wrong, so no rate; a hypothesis there is insertions
    assert word_errors("", "hello there") == WordErrors(0, 2, 0, 0)
    assert word_errors("", "hello").rate is None and word_errors("...", "").rate is None
    # the corpus rate pools the words: 1 error in 4 words + 0 in 2 words = 1/6, not mean(1/4, 0)
    assert pooled_rate([word_errors(ref, "The circle is green."), word_errors("It did.", "it did"),
                        None]) == pytest.approx(1 / 6)
    assert pooled_rate([]) is None


def test_reply_judged_by_slot_rule_and_wer_per_type():
    recs = [dict(qtype="what_color", expected="green.", text="The square is green."),
            dict(qtype="what_color", expected="green.", text="The square is red."),
            dict(qtype="count_beeps", expected="two.", text="I heard 2 beeps."),
            dict(qtype="count_beeps", expected="none.", text="")]
    heard = ["the square is green", "The square is red.", "I heard two beeps and", "I heard no beeps."]
    for r, t in zip(recs, heard):
        judge_reply(r, t, np.zeros(0, np.float32), None)
    # heard right: the expected answer's slots in the transcript, whatever the reply said
    assert [r["heard_slots"] for r in recs] == [True, False, True, True]
    assert [r["word_errors"] for r in recs[:3]] == [vars(WordErrors(0, 0, 0, 4)),
                                                     vars(WordErrors(0, 0, 0, 4)),
                                                     vars(WordErrors(0, 1, 0, 4))]
    assert recs[3]["word_errors"] is None and "dnsmos" not in recs[3]   # no text: no WER
    s = spoken_summary(recs)
    assert s["overall"]["n"] == 4 and s["overall"]["heard_slots"] == 0.75
    assert s["overall"]["wer"] == pytest.approx(1 / 12) and s["overall"]["wer_replies"] == 3
    assert s["by_type"]["what_color"] == {"n": 2, "heard_slots": 0.5, "wer": 0.0, "wer_replies": 2,
                                          "dnsmos": {"ovrl": None, "sig": None, "bak": None}}
    assert s["by_type"]["count_beeps"]["wer"] == 0.25
    assert heard_right("No.", "no.", "is_there") and not heard_right("none", "no.", "is_there")
    assert heard_right("anything", "no.", "free_talk") is None


@pytest.fixture(scope="module")
def dnsmos():
    return Dnsmos()


@pytest.fixture(scope="module")
def speech():
    from speech.tts import AGENT_VOICE, synthesize
    return synthesize("The square is green. It came from the left.", AGENT_VOICE)


def test_dnsmos_prefers_speech_to_noise(dnsmos, speech):
    rng = np.random.default_rng(0)
    clean = dnsmos.score(speech)
    noise = dnsmos.score((0.1 * rng.standard_normal(len(speech))).astype(np.float32))
    noisy = dnsmos.score(speech + (0.05 * rng.standard_normal(len(speech))).astype(np.float32))
    assert set(clean) == {"ovrl", "sig", "bak"} and all(1 <= v <= 5 for v in clean.values())
    assert clean["ovrl"] > noisy["ovrl"] + 0.3 and noisy["ovrl"] > noise["ovrl"], (clean, noisy, noise)
    assert clean["bak"] > noisy["bak"] + 0.5, (clean, noisy)       # BAK: the background noise
    assert noise["sig"] < 2.0 < clean["sig"], (noise, clean)      # SIG: is there speech at all
    assert dnsmos.score(np.zeros(0, np.float32)) is None


def test_dnsmos_resamples_other_rates(dnsmos):
    """Audio at the codec's rate (here 24 kHz) is resampled to 16 kHz before scoring: the
    same utterance scores about the same at either rate, and unlike its samples read as 16 kHz."""
    from speech.resample import resample_whole
    from speech.tts import AGENT_VOICE, synthesize
    x24 = synthesize("It is on the left.", AGENT_VOICE, 24_000)
    at16 = dnsmos.score(resample_whole(x24, 24_000, 16_000), 16_000)
    at24 = dnsmos.score(x24, 24_000)
    wrong = dnsmos.score(x24, 16_000)                               # 1.5x too slow, pitch down
    assert abs(at24["ovrl"] - at16["ovrl"]) < 0.02, (at24, at16)
    assert abs(wrong["sig"] - at16["sig"]) > 0.05, (wrong, at16)


def test_dnsmos_scores_as_speechmos_does(dnsmos, speech, monkeypatch):
    """speechmos's own `run` on the same clips gives the same SIG/BAK/OVRL (its module imports
    librosa for the P.808 score alone; a stand-in feeds that model a constant spectrogram)."""
    fake = types.ModuleType("librosa")
    fake.feature = types.SimpleNamespace(
        melspectrogram=lambda y, sr, n_fft, hop_length, n_mels: np.ones((n_mels, 900), np.float32))
    fake.power_to_db = lambda m, ref: m
    monkeypatch.setitem(sys.modules, "librosa", fake)
    monkeypatch.delitem(sys.modules, "speechmos.dnsmos", raising=False)
    from speechmos import dnsmos as reference
    for clip in (speech[:17_400], speech):      # 1.09 s (tiled, windows dropped by rounding), 2.7 s
        want = reference.run(clip, 16_000)
        got = dnsmos.score(clip)
        assert got == pytest.approx({k: float(want[f"{k}_mos"]) for k in got}, abs=1e-6), (got, want)
