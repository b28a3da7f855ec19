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
    from speech.tts import ESPEAK_AGENT_VOICE, synthesize
    return synthesize("The square is green. It came from the left.", ESPEAK_AGENT_VOICE)


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
    from speech.tts import ESPEAK_AGENT_VOICE, synthesize
    x24 = synthesize("It is on the left.", ESPEAK_AGENT_VOICE, 24_000)
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


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from lab.data import main
    d = tmp_path_factory.mktemp("spoken") / "data"
    main(d, n_train_sessions=0, n_val_sessions=0, n_test_sessions=1, turns_per_session=2,
         n_codec_sentences=0, n_codec_eval=0, workers=1, progress=False)
    return d


def test_eval_reports_spoken_scores_per_type_and_the_natural_split(tiny_data, dnsmos, tmp_path, monkeypatch):
    """A random tiny agent through `evaluate`: eval.json, eval.md and the model card carry the
    slot-rule, WER and DNSMOS columns per mode and type, and the natural-voice table (here a
    copy of the data with its second question dropped: the same scoring path, on its own split)."""
    import json
    import shutil
    from app.agent import random_agent
    from demo.replies import slot_match
    from lab import eval as ev
    from lab.model_card import write_model_card
    from speech.audio import load_audio
    natural = tmp_path / "natural"
    shutil.copytree(tiny_data, natural)
    events = natural / "test" / "00000" / "events.jsonl"
    lines = events.read_text().splitlines()
    last_q = max(i for i, line in enumerate(lines) if json.loads(line)["type"] == "question")
    events.write_text("\n".join(line for i, line in enumerate(lines) if i != last_q) + "\n")
    with pytest.raises(FileNotFoundError, match="--question-voice piper"):   # before any replay
        ev.evaluate(ev.EvalOptions(data=str(tiny_data), natural_data=str(tmp_path / "none"), progress=False))
    monkeypatch.setattr(ev, "load_eval_agent", lambda o: random_agent("tiny", device="cpu"))
    out = tmp_path / "eval"
    ev.evaluate(ev.EvalOptions(data=str(tiny_data), natural_data=str(natural), out=str(out), device="cpu",
                               threads=1, max_text_tokens=4, max_audio_seconds=0.4, turn_end="silence",
                               progress=False))
    r = json.loads((out / "eval.json").read_text())
    qtypes = sorted({t["qtype"] for t in r["turns"]})
    for mode in ("vanilla", "mctp"):
        sp = r["modes"][mode]["spoken"]
        rows = [t["modes"][mode] for t in r["turns"]]
        heard = [slot_match(x["transcript"], t["expected"], t["qtype"]) for x, t in zip(rows, r["turns"])]
        assert [x["heard_slots"] for x in rows] == heard
        assert sp["overall"]["heard_slots"] == pytest.approx(sum(heard) / 2)
        errs = [word_errors(x["text"], x["transcript"]) for x in rows if x["text"].strip()]
        assert sp["overall"]["wer"] == pytest.approx(pooled_rate(errs)) and sp["overall"]["wer_replies"] == len(errs)
        assert all(1 <= x["dnsmos"]["ovrl"] <= 5 for x in rows)
        for x in rows:                                  # the reply's own audio, as replay wrote it
            wav = out / "replays" / mode / r["turns"][0]["session"] / "turns" / f"turn_{x['engine_turn']:03d}.wav"
            assert x["dnsmos"] == pytest.approx(dnsmos.score(load_audio(wav))), wav
        assert sp["overall"]["dnsmos"]["ovrl"] == pytest.approx(sum(x["dnsmos"]["ovrl"] for x in rows) / 2)
        assert sorted(sp["by_type"]) == qtypes and sum(c["n"] for c in sp["by_type"].values()) == 2
        nat = r["natural"]["modes"][mode]
        assert nat["questions"] == nat["accuracy"]["n"] == 1 and nat["missed"] == 0
    ref = r["spoken_reference"]
    assert ref["heard_slots"] is not None and ref["wer"] is not None and 1 <= ref["dnsmos"]["ovrl"] <= 5
    assert (out / "natural" / "replays" / "mctp").is_dir()
    md = (out / "eval.md").read_text()
    assert "| **overall** | 2 | 1 |" in md                       # n test, n natural
    for s in ("## Natural voices", "vanilla: natural voices", "heard right (slot rule)", "word error rate",
              "DNSMOS OVRL (SIG / BAK)", "vanilla heard right", "mctp DNSMOS", *qtypes):
        assert s in md, s
    card = write_model_card(out / "eval.json", tmp_path / "no-run", tmp_path / "no-report.json",
                            tmp_path / "CARD.md").read_text()
    assert "### Natural voices" in card and "mctp: natural voices" in card and "mctp WER" in card
