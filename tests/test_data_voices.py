"""Who asks the questions (`run.py data --question-voice mix|espeak|piper`, demo/voices.py,
demo/room.py): diverse training voices, held-out test voices, Piper only as the natural-voice
test."""
import json
import zlib
from dataclasses import replace

import numpy as np
import pytest

from demo import room as Rm
from demo import voices as V
from demo import world as W
from speech import tts
from speech.constants import SAMPLE_RATE as SR

PIPER = tts.PiperVoice("en_US-joe-medium")


def fake_synth(text, voice, sample_rate=SR):
    """Speech-like stand-in (no TTS): a tone as long as the text, pitched by the voice."""
    n = int(0.06 * len(text) * sample_rate)
    f = 100.0 + zlib.crc32(tts.voice_spec(voice).encode()) % 200
    return (0.3 * np.sin(2 * np.pi * f * np.arange(n) / sample_rate)).astype(np.float32)


def test_mix_draws_every_training_voice_and_never_a_held_out_one_or_piper():
    draws = [V.sample_voice(np.random.default_rng([1, i]), False, "mix") for i in range(3000)]
    names, variants = V.voice_pool(False)
    espeak = [v for v in draws if isinstance(v, tts.Voice)]
    flite = [v for v in draws if isinstance(v, tts.FliteVoice)]
    fest = [v for v in draws if isinstance(v, tts.FestivalVoice)]
    assert len(espeak) + len(flite) + len(fest) == len(draws)         # no Piper, nothing else
    assert {v.name for v in espeak} == set(names) and {v.variant for v in espeak} == set(variants)
    assert not {v.name for v in espeak} & set(V.HELDOUT_VOICE_NAMES)
    assert not {v.variant for v in espeak} & set(V.HELDOUT_VARIANTS)
    assert all(V.USER_WPM[0] <= v.rate_wpm <= V.USER_WPM[1] and
               V.USER_PITCH[0] <= v.pitch <= V.USER_PITCH[1] for v in espeak)
    assert {v.name for v in flite} == set(tts.FLITE_VOICES)           # flite is installed (Makefile)
    assert 0.15 < len(flite) / len(draws) < 0.25
    assert all(V.FLITE_STRETCH[0] <= v.stretch <= V.FLITE_STRETCH[1] for v in flite)
    assert len({v.stretch for v in flite}) > 100 and len({v.f0_hz for v in flite}) > 30
    assert all(V.FLITE_F0_SCALE[0] - 0.01 <= v.f0_hz / V.FLITE_F0_HZ[v.name] <= V.FLITE_F0_SCALE[1]
               + 0.01 for v in flite if v.name != "rms")
    assert all(v.f0_hz is None for v in flite if v.name == "rms")
    assert {v.name for v in fest} == set(tts.FESTIVAL_VOICES)         # Festival too (Makefile)
    assert 0.07 < len(fest) / len(draws) < 0.13
    assert all(V.FLITE_F0_SCALE[0] - 0.01 <= v.f0_hz / V.FESTIVAL_F0_HZ[v.name]
               <= V.FLITE_F0_SCALE[1] + 0.01 for v in fest if v.name in V.FESTIVAL_F0_HZ)
    assert len({v.stretch for v in fest}) > 100 and len({v.f0_hz for v in fest}) > 20
    again = [V.sample_voice(np.random.default_rng([1, i]), False, "mix") for i in range(50)]
    assert again == draws[:50]                                        # deterministic per seed
    test = [V.sample_voice(np.random.default_rng([1, i]), True, "mix") for i in range(50)]
    assert test == [V.sample_voice(np.random.default_rng([1, i]), True, "espeak") for i in range(50)]


def test_mix_sessions_sound_in_rooms_reproducibly_and_the_test_split_is_unchanged():
    def session(split, i, voices):
        return W.sample_session(np.random.default_rng([0, 0, i]), 2,
                                W.SplitRules(split, voices=voices), synth=fake_synth)
    specs = [session("train", i, "mix") for i in range(40)]
    rooms = [s.room for s in specs if s.room is not None]
    assert 10 <= len(rooms) <= 30 and len({r.seed for r in rooms}) == len(rooms)
    assert all(Rm.RT60_S[0] <= r.rt60_s <= Rm.RT60_S[1] and Rm.DRR_DB[0] <= r.drr_db <= Rm.DRR_DB[1]
               for r in rooms)
    voices = [t.voice for s in specs for t in s.turns]
    assert any(isinstance(v, tts.FliteVoice) for v in voices) and PIPER not in voices
    assert all(session("train", i, "espeak").room is None for i in range(10))
    assert session("train", 3, "mix") == specs[3]
    roomy = next(s for s in specs if s.room is not None and any(
        isinstance(t.voice, tts.FliteVoice) for t in s.turns))
    assert W.SessionSpec.from_dict(json.loads(json.dumps(roomy.to_dict()))) == roomy
    assert "room" not in replace(roomy, room=None).to_dict()         # dry specs as before rooms
    assert all(session("test", i, "mix") == session("test", i, "espeak") for i in range(5))


def test_a_room_reverberates_the_speech_only_keeping_its_length_and_level():
    spec = next(s for i in range(40) if (s := W.sample_session(
        np.random.default_rng([0, 0, i]), 1, W.SplitRules("train", voices="mix"),
        synth=fake_synth)).room is not None)
    q = W.question_audio(spec, synth=fake_synth)
    wet, dry = W.render_audio(spec, q), W.render_audio(replace(spec, room=None), q)
    t = spec.turns[0]
    a, b = int(round(t.t_q0 * SR)), int(round(t.t_q1 * SR))
    assert len(wet) == len(dry) and np.array_equal(wet[:a], dry[:a])     # beeps: dry
    assert np.array_equal(wet[b + 1:], dry[b + 1:])                    # the tail ends with the question
    rms = [float(np.sqrt(np.mean(np.square(x[a:b], dtype=np.float64)))) for x in (wet, dry)]
    assert abs(20 * np.log10(rms[0] / rms[1])) < 1.0                 # the turn's speech level holds
    assert np.abs(wet[a:b] - dry[a:b]).max() > 0.1 * np.abs(dry[a:b]).max()
    h = Rm.impulse_response(spec.room, SR)
    pre = int(round(spec.room.predelay_s * SR))
    tail = h[pre + 1:]
    assert h[0] == 1.0 and not h[1:pre + 1].any()
    assert abs(10 * np.log10(np.sum(tail ** 2)) + spec.room.drr_db) < 0.01   # direct/reverb ratio
    q4 = len(tail) // 4
    assert np.sum(tail[-q4:] ** 2) < 1e-3 * np.sum(tail[:q4] ** 2)       # decays (~60 dB by rt60)
    x = np.random.default_rng(0).standard_normal(1000)
    assert np.array_equal(Rm.reverberate(x, None, SR), x)
    with pytest.raises(ValueError, match="rt60_s"):
        Rm.Room(5.0, 6.0, 0.01, 0)


def _f0(x):
    """Median pitch (Hz) of the voiced frames, by autocorrelation."""
    out = []
    for i in range(0, len(x) - 1024, 400):
        fr = x[i:i + 1024]
        if np.sqrt(np.mean(fr ** 2)) < 0.03 * np.abs(x).max():
            continue
        ac = np.correlate(fr, fr, "full")[1023:]
        k = SR // 400 + int(np.argmax(ac[SR // 400:SR // 60]))
        if ac[k] > 0.4 * ac[0]:
            out.append(SR / k)
    return float(np.median(out))


def test_flite_question_voices_change_rate_and_pitch():
    text = "What color is the square on the left?"
    base = tts.synthesize(text, tts.FliteVoice("kal16"))
    high = tts.synthesize(text, tts.FliteVoice("kal16", 1.0, 130))
    slow = tts.synthesize(text, tts.FliteVoice("awb", 1.25))          # awb follows it closely
    assert len(slow) > 1.15 * len(tts.synthesize(text, tts.FliteVoice("awb")))
    assert len(tts.synthesize(text, tts.FliteVoice("kal16", 1.25))) > 1.08 * len(base)
    assert _f0(high) > 1.25 * _f0(base), (_f0(high), _f0(base))          # ~91 Hz -> ~130 Hz
    with pytest.raises(ValueError, match="ignores pitch"):              # flite 2.2 would not
        tts.FliteVoice("rms", 1.0, 130)
    v = tts.FliteVoice("slt", 1.1, 180)
    assert tts.parse_voice(tts.voice_spec(v)) == v == tts.voice_from_dict(v.to_dict())
    assert tts.FliteVoice("rms").to_dict() == {"engine": "flite", "name": "rms"}   # as before


def test_festival_question_voices_change_rate_and_pitch():
    text = "What color is the square on the left?"
    base = tts.synthesize(text, tts.FestivalVoice("kal_diphone"))
    high = tts.synthesize(text, tts.FestivalVoice("kal_diphone", 1.0, 140))
    assert len(tts.synthesize(text, tts.FestivalVoice("kal_diphone", 1.25))) > 1.15 * len(base)
    assert _f0(high) > 1.25 * _f0(base), (_f0(high), _f0(base))          # ~97 Hz -> ~140 Hz
    hts = tts.synthesize(text, tts.FestivalVoice("cmu_us_slt_arctic_hts"))   # 32 kHz: resampled
    assert 1.0 < len(hts) / SR < 4.0 and _f0(hts) > 1.3 * _f0(base)          # a woman's voice
    with pytest.raises(ValueError, match="ignores pitch"):
        tts.FestivalVoice("cmu_us_slt_arctic_hts", 1.0, 130)
    v = tts.FestivalVoice("ked_diphone", 0.9, 110)
    assert tts.parse_voice(tts.voice_spec(v)) == v == tts.voice_from_dict(v.to_dict())
    for bad in ("festival:bob", "festival:kal_diphone:1.1", "festival:kal_diphone:9:100"):
        with pytest.raises(ValueError):
            tts.parse_voice(bad)


def test_piper_speaks_only_the_test_split(tmp_path, monkeypatch):
    """--question-voice piper: a test-only split whose questions are Piper en_US-joe-medium's,
    paired with the regular test split of the same seed; train and val refuse."""
    import run
    from app.session import load_session
    from lab.data import DataOptions, main
    m = main(tmp_path / "n", n_train_sessions=0, n_val_sessions=0, n_test_sessions=1,
             turns_per_session=1, seed=2, workers=1, progress=False, n_codec_sentences=0,
             n_codec_eval=0, replies="v1", question_voice="piper")
    assert m["question_voice"] == "piper" and m["question_voices"]["test"] == {"piper": [PIPER.name]}
    assert m["piper"].startswith("piper-tts ")
    ses = load_session(tmp_path / "n" / "test" / "00000")
    spec = W.SessionSpec.from_dict(ses.meta["spec"])
    (turn,) = spec.turns
    assert turn.voice == PIPER and ses.meta["spec"]["turns"][0]["voice"]["engine"] == "piper"
    speech = tts.synthesize_cached(turn.question.text, PIPER)
    assert abs(len(speech) - (turn.t_q1 - turn.t_q0) * SR) <= 1             # Piper's timing
    mic = ses.audio
    ref = W.render_audio(spec, [speech])
    assert np.abs(mic[:len(ref)] - ref).max() < 1e-3                       # Piper's samples
    espeak = W.sample_session(np.random.default_rng([2, 2, 0]), 1, W.SplitRules("test"))
    assert espeak.turns[0].question == turn.question                      # the same question
    assert espeak.turns[0].scene.objects == turn.scene.objects            # about the same scene
    assert espeak.turns[0].voice.name in V.HELDOUT_VOICE_NAMES
    for kw in ({"n_train_sessions": 1}, {"n_val_sessions": 1}):
        with pytest.raises(ValueError, match="natural-voice test.*--question-voice piper --train 0"):
            DataOptions(n_test_sessions=1, question_voice="piper", **{"n_train_sessions": 0,
                                                                        "n_val_sessions": 0, **kw})
    for split in ("train", "val"):
        with pytest.raises(ValueError, match="never speaks"):
            W.SplitRules(split, voices="piper")
    with pytest.raises(ValueError, match="one of mix, espeak, piper"):
        DataOptions(question_voice="festival")
    assert run.DATA_QUESTION_VOICES == tuple(V.QUESTION_VOICES)
    got = {}
    monkeypatch.setattr("lab.data.main", lambda out, **kw: got.update(kw))
    p = run.build_parser()
    args = p.parse_args(["data", "--question-voice", "piper", "--out", str(tmp_path / "x")])
    args.func(args)                                   # train and val default to 0 for piper
    assert got["question_voice"] == "piper" and got["n_train_sessions"] == got["n_val_sessions"] == 0
    assert got["n_codec_sentences"] == 0 and "n_test_sessions" not in got     # the default test size
    got.clear()
    args = p.parse_args(["data", "--codec-sentences", "0", "--out", str(tmp_path / "x")])
    args.func(args)                                   # an eval-only split: no codec corpus
    assert got["n_codec_sentences"] == got["n_codec_eval"] == 0 and "n_train_sessions" not in got
    args = p.parse_args(["data", "--codec-sentences", "45", "--out", str(tmp_path / "x")])
    args.func(args)
    assert (got["n_codec_sentences"], got["n_codec_eval"]) == (45, 3)   # held out: 1 in 15
    monkeypatch.undo()
    args = p.parse_args(["data", "--question-voice", "piper", "--train", "2", "--out",
                         str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="natural-voice test"):
        args.func(args)
    assert not (tmp_path / "y").exists()
