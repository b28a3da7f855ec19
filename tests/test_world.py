"""The demo world (docs/DEMO_WORLD.md): sampled specs obey every rule, rendering draws what
the spec says, data generation is reproducible and loads as sessions."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from demo import world as W
from speech import tts
from speech.constants import CONTEXT_SECONDS, SAMPLE_RATE

BASE_RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230),
            "yellow": (230, 210, 40)}
# The page's table, written out again independently of fusion/world.py.
TABLE = {
    "what_color": ("visual", r"What color is the (circle|square|triangle)\?"),
    "shape_at": ("visual", r"What shape is on the (left|middle|right)\?"),
    "count_objects": ("visual", r"How many objects are there\?"),
    "is_there": ("visual", r"Is there a (red|green|blue|yellow) (circle|square|triangle)\?"),
    "where_is": ("visual", r"Where is the (red|green|blue|yellow) (circle|square|triangle)\?"),
    "count_beeps": ("audio", r"How many beeps did you hear\?"),
    "pitch": ("audio", r"Was the sound high or low\?"),
    "which_object": ("audio-visual", r"Which object made the sound\?"),
    "where_sound": ("audio-visual", r"Where did the sound come from\?"),
    "color_of_sound": ("audio-visual", r"What color is the object that beeped\?"),
    "did_make_sound": ("audio-visual",
                       r"Did the (red|green|blue|yellow) (circle|square|triangle) make a "
                       r"sound\?"),
}
NUM = {1: "one", 2: "two", 3: "three"}


@pytest.fixture(scope="module")
def specs():
    out = {}
    for split, n in (("train", 16), ("val", 3), ("test", 6)):
        rng = np.random.default_rng(123 + len(split))
        out[split] = [W.sample_session(rng, 8, W.SplitRules(split)) for _ in range(n)]
    return out


def all_turns(specs):
    return [t for ss in specs.values() for s in ss for t in s.turns]


def expected_answer(scene: W.Scene, question: W.Question) -> str | None:
    """The answer from the scene alone (None: not defined). Sounding object = the one
    whose pulses coincide with the beeps."""
    m = re.fullmatch(TABLE[question.qtype][1], question.text)
    assert m, question
    objs = scene.objects
    beeps = [(b.t0, b.dur) for b in scene.beeps]
    snd = [o for o in objs
           if beeps and [(p.t0, p.dur) for p in scene.pulses if p.slot == o.slot] == beeps]
    snd = snd[0] if snd else None
    pairs = Counter((o.color, o.shape) for o in objs)
    by = {"shape": Counter(o.shape for o in objs)}
    q = question.qtype
    if q == "what_color":
        o = [o for o in objs if o.shape == m[1]]
        return f"{o[0].color}." if by["shape"][m[1]] == 1 else None
    if q == "shape_at":
        o = [o for o in objs if o.slot == m[1]]
        return f"a {o[0].shape}." if o else None
    if q == "count_objects":
        return f"{NUM[len(objs)]}."
    if q == "is_there":
        return "yes." if pairs[(m[1], m[2])] else "no."
    if q == "where_is":
        o = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
        return f"on the {o[0].slot}." if len(o) == 1 else None
    if q == "count_beeps":
        return f"{NUM[len(beeps)]}." if beeps else "none."
    if snd is None:
        return None
    if q == "pitch":
        return "high." if 1500 <= scene.beeps[0].freq <= 1800 else "low."
    if q == "which_object":
        return f"the {snd.color} {snd.shape}." if pairs[(snd.color, snd.shape)] == 1 else None
    if q == "where_sound":
        return f"the {snd.slot}."
    if q == "color_of_sound":
        return f"{snd.color}."
    o = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
    return None if len(o) != 1 else ("yes." if o[0] is snd else "no.")


def check_run(events, what):
    for (a0, ad), (b0, _) in zip(events, events[1:]):
        assert 0.20 - 1e-9 <= b0 - (a0 + ad) <= 0.35 + 1e-9, (what, events)
    for _, d in events:
        assert 0.20 - 1e-9 <= d <= 0.30 + 1e-9, (what, events)


def test_specs_obey_every_rule(specs):
    turns = all_turns(specs)
    assert len(turns) == 200
    for ss in specs.values():
        for s in ss:
            assert 0 <= s.turns[0].t_scene
            assert s.duration == s.turns[-1].t_next
            for a, b in zip(s.turns, s.turns[1:]):
                assert b.t_scene == a.t_next                      # next turn, new scene
            speech = min(t.speech_dbfs for t in s.turns)
            assert s.noise_level is None or s.noise_level <= speech - 25
            for i, t in enumerate(s.turns):                       # window holds only this turn
                lo = t.t_q1 - CONTEXT_SECONDS
                for j, u in enumerate(s.turns):
                    ev = [(b.t0, b.dur) for b in u.scene.beeps] + \
                         [(p.t0, p.dur) for p in u.scene.pulses]
                    assert i == j or all(e0 + d <= lo or e0 >= t.t_q1 for e0, d in ev)
    for t in turns:
        sc = t.scene
        assert 2.5 - 1e-9 <= t.t_q0 - t.t_scene <= 4.0 + 1e-9
        assert 0.5 < t.t_q1 - t.t_q0 < 4.0 and t.t_next - t.t_q1 >= 2.5
        assert 130 <= t.voice.rate_wpm <= 200
        assert t.speech_noise_db is None or t.speech_noise_db >= 25
        assert 1 <= len(sc.objects) <= 3
        assert len({o.slot for o in sc.objects}) == len(sc.objects)
        for o in sc.objects:
            assert o.shape in ("circle", "square", "triangle")
            assert all(abs(a - b) <= 25 for a, b in zip(o.rgb, BASE_RGB[o.color])), o
            assert 50 <= o.size_px <= 80 and abs(o.y_px / 240 - 0.5) <= 0.08 + 1e-9, o
        bg = sc.background
        assert bg.kind in ("flat", "vgrad", "hgrad", "noise")
        assert max(bg.color0 + bg.color1) <= 80 and min(bg.color0 + bg.color1) >= 0
        lo, hi = max(t.t_scene, t.t_q1 - CONTEXT_SECONDS), t.t_q0   # in scene AND window
        events = [(b.t0, b.dur) for b in sc.beeps] + [(p.t0, p.dur) for p in sc.pulses]
        assert all(lo <= e0 and e0 + d <= hi for e0, d in events), (t, lo, hi)
        beeps = [(b.t0, b.dur) for b in sc.beeps]
        assert len(beeps) <= 3
        check_run(beeps, "beeps")
        assert len({b.freq for b in sc.beeps}) <= 1
        for b in sc.beeps:
            assert 400 <= b.freq <= 500 or 1500 <= b.freq <= 1800, b
            assert -20 <= b.level_dbfs <= -10, b
        assert (sc.sound_slot is None) == (not beeps)
        by_slot = {}
        for p in sc.pulses:
            assert 1.25 <= p.scale <= 1.35 and 0 < p.brighten <= 40, p
            by_slot.setdefault(p.slot, []).append((p.t0, p.dur))
        assert set(by_slot) <= {o.slot for o in sc.objects}
        if beeps:
            assert by_slot.get(sc.sound_slot) == beeps             # exactly with its beeps
        others = {k: v for k, v in by_slot.items() if k != sc.sound_slot}
        assert len(others) <= 1                                    # one distractor at most
        for run in others.values():
            check_run(run, "distractor")
            for p0, pd in run:                                     # never during a beep
                assert all(p0 + pd <= b0 or p0 >= b0 + bd for b0, bd in beeps)
        q = t.question
        assert TABLE[q.qtype][0] == q.type_group
        assert expected_answer(sc, q) == q.answer, (q, sc)
    # randomised: every kind of scene occurs
    assert any(not t.scene.beeps for t in turns) and any(len(t.scene.beeps) == 3 for t in turns)
    assert any(len({p.slot for p in t.scene.pulses} - {t.scene.sound_slot}) for t in turns)
    assert {t.scene.background.kind for t in turns} == {"flat", "vgrad", "hgrad", "noise"}
    assert any(s.noise_level is None for ss in specs.values() for s in ss)
    assert any(s.noise_level is not None for ss in specs.values() for s in ss)


def test_question_types_balanced_and_answers_varied(specs):
    turns = all_turns(specs)
    counts = Counter(t.question.qtype for t in turns)
    assert set(counts) == set(TABLE) == set(W.QTYPES)
    mean = len(turns) / len(TABLE)
    assert all(0.5 * mean <= c <= 1.6 * mean for c in counts.values()), counts
    answers = lambda q: {t.question.answer for t in turns if t.question.qtype == q}  # noqa
    assert answers("is_there") == answers("did_make_sound") == {"yes.", "no."}
    assert answers("pitch") == {"high.", "low."}
    assert answers("count_beeps") == {"none.", "one.", "two.", "three."}
    assert {t.question.answer for t in turns} <= set(W.all_answer_texts())


def test_holdouts(specs):
    for split in ("train", "val"):
        for s in specs[split]:
            for t in s.turns:
                assert t.voice.name not in W.HELDOUT_VOICE_NAMES
                assert t.voice.variant not in W.HELDOUT_VARIANTS
                assert not {(o.color, o.shape, o.slot) for o in t.scene.objects} & \
                    set(W.HELDOUT_TRIPLES)
    test_turns = [t for s in specs["test"] for t in s.turns]
    assert all(t.voice.name in W.HELDOUT_VOICE_NAMES and t.voice.variant in W.HELDOUT_VARIANTS
               for t in test_turns)
    with_heldout = [t for t in test_turns if {(o.color, o.shape, o.slot) for o in
                                              t.scene.objects} & set(W.HELDOUT_TRIPLES)]
    assert len(with_heldout) >= 0.3 * len(test_turns)
    # every answer phrase of a held-out triple is still sayable without it in train
    for c, s, p in W.HELDOUT_TRIPLES:
        assert any((c2, s2, p2) not in W.HELDOUT_TRIPLES for c2, s2, p2 in
                   [(c, s, q) for q in W.SLOTS] + [(c2, s, p) for c2 in W.COLORS])


def test_json_round_trip_and_reproducible(specs):
    s = specs["val"][0]
    assert W.SessionSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    rng = lambda: np.random.default_rng(7)  # noqa
    a = W.sample_session(rng(), 3, W.SplitRules("train"))
    tts._synthesize_cached.cache_clear()                  # re-synthesise from scratch
    b = W.sample_session(rng(), 3, W.SplitRules("train"))
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert np.array_equal(W.render_audio(a, W.question_audio(a)),
                          W.render_audio(b, W.question_audio(b)))
    c = W.sample_session(np.random.default_rng(8), 3, W.SplitRules("train"))
    assert c != a


def _scene(pulse_slot="middle"):
    bg = W.Background("flat", (20, 30, 40), (20, 30, 40), 0, 0)
    objs = (W.WorldObject("circle", "red", "left", (220, 40, 40), 60.0, 120.0),
            W.WorldObject("square", "blue", "middle", (50, 90, 230), 70.0, 110.0),
            W.WorldObject("triangle", "yellow", "right", (230, 210, 40), 64.0, 130.0))
    beep = W.Beep(1.0, 0.25, 1600.0, -12.0)
    return W.Scene(bg, objs, (beep,), (W.Pulse(pulse_slot, 1.0, 0.25, 1.3, 30),), "middle")


def _width(img, row, bg_bgr):
    return int(np.sum(np.any(np.abs(img[row].astype(int) - bg_bgr) > 30, axis=1)))


@pytest.mark.parametrize("size", [(320, 240), (640, 480)])
def test_render_frame_draws_the_scene(size):
    sc, (w, h) = _scene(), size
    k = min(w / 320, h / 240)
    still, pulsed = W.render_frame(sc, 0.5, size), W.render_frame(sc, 1.1, size)
    assert still.shape == (h, w, 3) and still.dtype == np.uint8
    for o in sc.objects:
        x, y = int(W.SLOT_X[o.slot] * w), int(o.y_px / 240 * h)
        assert np.abs(still[y, x].astype(int) - o.rgb[::-1]).max() <= 2, o   # BGR
    assert np.array_equal(still[: int(40 * k)], np.broadcast_to((40, 30, 20), still[
        : int(40 * k)].shape))                                    # dark background elsewhere
    mid = sc.objects[1]
    y, x = int(mid.y_px / 240 * h), int(0.5 * w)
    assert abs(_width(still[:, int(0.35 * w):int(0.65 * w)], y, (40, 30, 20))
               - 70 * k) <= 2
    assert abs(_width(pulsed[:, int(0.35 * w):int(0.65 * w)], y, (40, 30, 20))
               - 91 * k) <= 2
    assert np.abs(pulsed[y, x].astype(int) - (255, 120, 80)).max() <= 2   # +30, clipped
    assert np.array_equal(still[:, : int(0.35 * w)], pulsed[:, : int(0.35 * w)])
    assert np.array_equal(W.render_frame(sc, 1.25, size), still)   # over when the beep is


def test_render_session_frames(specs):
    s = specs["train"][0]
    first = s.turns[0]
    before = W.render_frame(s, first.t_scene / 2)                  # empty stage
    assert before.max() <= 80
    t1 = s.turns[1]
    for t in (t1.t_q0, t1.t_q1, t1.t_next - 0.01):                 # scene stays, unchanged
        assert np.array_equal(W.render_frame(s, t), W.render_frame(t1.scene, t1.t_q0))
    for sp in specs["train"][:4]:
        for t in np.arange(0, sp.duration, 0.37):
            img = W.render_frame(sp, float(t))
            assert img[:40].max() <= 80 and img[205:].max() <= 80  # background is dark


def _band_rms(x, freq, sr=SAMPLE_RATE):
    n = np.arange(len(x))
    return abs(np.mean(x * np.exp(-2j * np.pi * freq * n / sr))) * np.sqrt(2)


def test_render_audio_beeps_speech_noise(specs):
    s = next(s for s in specs["train"] if s.noise_level is not None and
             sum(len(t.scene.beeps) for t in s.turns) >= 4)
    audio = W.render_audio(s, W.question_audio(s))
    assert audio.dtype == np.float32 and len(audio) == round(s.duration * SAMPLE_RATE)
    sr = SAMPLE_RATE
    for t in s.turns:
        if t.scene.beeps:
            f = t.scene.beeps[0].freq
            for b in t.scene.beeps:
                a = int((b.t0 + 0.02) * sr)
                level = _band_rms(audio[a:a + int(0.15 * sr)], f)
                assert abs(20 * np.log10(level) - (b.level_dbfs - 3.01)) < 1.0
            edges = [t.t_scene] + [x for b in t.scene.beeps for x in (b.t0, b.t0 + b.dur)] \
                + [t.t_q0]
            for g0, g1 in zip(edges[::2], edges[1::2]):            # silent stretches
                if g1 - g0 > 0.06:
                    seg = audio[int((g0 + 0.02) * sr):int((g1 - 0.02) * sr)]
                    assert _band_rms(seg, f) < 10 ** ((t.scene.beeps[0].level_dbfs - 30) / 20)
        q = audio[int(t.t_q0 * sr):int(t.t_q1 * sr)]
        assert abs(20 * np.log10(np.sqrt(np.mean(q.astype(np.float64) ** 2)))
                   - t.speech_dbfs) < 1.0
        quiet = audio[int((t.t_q1 + 0.5) * sr):int((t.t_next - 0.5) * sr)]
        floor = 20 * np.log10(np.sqrt(np.mean(quiet.astype(np.float64) ** 2)))
        assert abs(floor - s.noise_level) < 2.0 and floor <= t.speech_dbfs - 25
    with pytest.raises(ValueError, match="question_audio"):
        W.render_audio(s, W.question_audio(s)[:-1])


def test_tts(monkeypatch):
    assert "en-us" in tts.list_english_voices()
    assert "f3" in tts.list_variants() and all(" " not in v for v in tts.list_variants())
    x = tts.synthesize("Was the sound high or low?", tts.ESPEAK_AGENT_VOICE)
    assert x.dtype == np.float32 and x.ndim == 1 and 0.5 < len(x) / SAMPLE_RATE < 3.0
    thr = np.abs(x).max() * 0.01
    loud = np.flatnonzero(np.abs(x) > thr)
    assert loud[0] <= 0.025 * SAMPLE_RATE and len(x) - loud[-1] <= 0.025 * SAMPLE_RATE
    with pytest.raises(ValueError):
        tts.Voice("en-us", None, 500, 50)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        tts.synthesize("hello", tts.Voice("en-us", None, 150, 50))
    with pytest.raises(RuntimeError, match="apt-get install flite"):
        tts.synthesize("hello", tts.FliteVoice("rms"))
    with pytest.raises(RuntimeError, match="apt-get install festival"):
        tts.synthesize("hello", tts.FestivalVoice("kal_diphone"))


def test_voice_specs_and_the_flite_engine():
    for voice in (tts.ESPEAK_AGENT_VOICE, tts.Voice("en-gb", None, 130, 20), tts.FliteVoice("slt")):
        assert tts.parse_voice(tts.voice_spec(voice)) == voice
        assert tts.voice_from_dict(voice.to_dict()) == voice
    assert tts.parse_voice("en-us+m3") == tts.ESPEAK_AGENT_VOICE                # rate, pitch: the agent's
    for bad in ("", "flite", "flite:bob", "flite:rms:1.2", "en-us:fast", "en-us:1:2:3", "en us"):
        with pytest.raises(ValueError):
            tts.parse_voice(bad)
    x = tts.synthesize("the yellow triangle.", tts.FliteVoice("rms"))
    assert x.dtype == np.float32 and x.ndim == 1 and 0.4 < len(x) / SAMPLE_RATE < 3.0
    y = tts.synthesize("the yellow triangle.", tts.ESPEAK_AGENT_VOICE)
    n = min(len(x), len(y))
    assert np.abs(x[:n] - y[:n]).mean() > 0.01                           # another voice indeed
    slow = tts.synthesize("the yellow triangle.", tts.FliteVoice("kal"))  # 8 kHz: resampled
    assert 0.4 < len(slow) / SAMPLE_RATE < 3.0


def test_data_main_tiny(tmp_path):
    from lab.data import TrainShards, main
    kw = dict(n_train_sessions=2, n_val_sessions=1, n_test_sessions=1, turns_per_session=2,
              seed=3, workers=1, progress=False, n_codec_sentences=5, n_codec_eval=2)
    m = main(tmp_path / "a", **kw)
    out = tmp_path / "a"
    assert m["counts"]["train"]["turns"] == 4 and m["counts"]["test"]["sessions"] == 1
    answers = json.loads((out / "answers" / "answers.json").read_text())
    from demo.replies import all_reply_texts
    assert set(answers) == set(all_reply_texts("v2")) and m["replies"] == "v2"   # the default
    assert all((out / "answers" / f).is_file() for f in answers.values())
    codec = json.loads((out / "codec" / "sentences.json").read_text())
    assert len(codec["train"]) == 5 and len(codec["eval"]) == 2
    assert not {e["text"] for e in codec["eval"]} & {e["text"] for e in codec["train"]}
    assert all((out / "codec" / e["file"]).is_file() for e in codec["train"] + codec["eval"])
    shards = TrainShards(out / "train")
    assert len(shards) == 4 and shards.n_sessions == 2
    spec, j = shards.turn(3)
    assert j == 1 and spec == shards.specs[1]
    mic = shards.mic(1)
    ref = W.render_audio(spec, W.question_audio(spec))
    assert mic.dtype == np.float32 and np.abs(mic - ref).max() < 1e-4
    from app.session import load_session
    ses = load_session(out / "test" / "00000")
    spec = W.SessionSpec.from_dict(ses.meta["spec"])
    assert ses.meta["world"] == "demo" and ses.meta["split"] == "test"
    assert len(ses.frames) == int(np.ceil(spec.duration * 10))
    assert abs(len(ses.audio) - spec.duration * SAMPLE_RATE) <= 1
    i = len(ses.frames) // 2
    img = ses.read_frame(i)
    assert img.shape == (240, 320, 3)
    assert np.abs(img.astype(int) - W.render_frame(spec, ses.frames[i].t)).mean() < 3
    qs = [e for e in ses.events if e["type"] == "question"]
    assert [e["type"] for e in ses.events] == ["scene", "question"] * 2
    assert [(q["t"], q["t_end"], q["answer"], q["qtype"], q["group"]) for q in qs] == \
        [(t.t_q0, t.t_q1, t.question.answer, t.question.qtype, t.question.type_group)
         for t in spec.turns]
    m2 = main(tmp_path / "b", **kw)                                 # same seed: same bytes
    assert m2["content_sha256"] == m["content_sha256"]
    assert m["options"]["agent_voice"] == tts.voice_spec(tts.AGENT_VOICE) == "piper:en_US-joe-medium"
    from demo.voices import flite_pool             # flite's version: only where it speaks
    assert m["question_voice"] == "mix" and ("flite" in m) == bool(flite_pool())
    from lab.data import DataOptions
    assert DataOptions(agent_voice="en-us+m3") == DataOptions(agent_voice="en-us+m3:165:50")  # one spelling


def test_data_with_a_flite_agent_voice_and_a_codec_of_another_voice(tmp_path):
    from lab.data import main
    from lab.pipeline import check_codec_voice
    from lab.train_codec import corpus_voice
    from speech.audio import load_audio
    m = main(tmp_path / "d", n_train_sessions=0, n_val_sessions=0, n_test_sessions=0, workers=1,
             progress=False, n_codec_sentences=3, n_codec_eval=1, agent_voice="flite:rms",
             replies="v1")
    out = tmp_path / "d"
    assert m["agent_voice"] == {"engine": "flite", "name": "rms"} and "flite-2" in m["flite"]
    assert corpus_voice(out / "codec") == tts.FliteVoice("rms")
    answers = json.loads((out / "answers" / "answers.json").read_text())
    got = load_audio(out / "answers" / answers["high."], SAMPLE_RATE)
    want = tts.synthesize("high.", tts.FliteVoice("rms"))
    assert len(got) == len(want) and np.abs(got - want).max() < 1e-3   # 16-bit files
    codec = tmp_path / "codec"                  # a codec whose report names no voice: ESPEAK_AGENT_VOICE's
    codec.mkdir()
    (codec / "report.json").write_text(json.dumps({"steps": 1}))
    with pytest.raises(ValueError, match="en-us\\+m3:165:50 but .* flite:rms; pass --force"):
        check_codec_voice(codec, out)
    (codec / "report.json").write_text(json.dumps({"voice": {"engine": "flite", "name": "rms"}}))
    check_codec_voice(codec, out)
    with pytest.raises(ValueError, match="flite:NAME"):
        main(tmp_path / "e", agent_voice="flite", progress=False)


def test_the_piper_voice_speaks_deterministically_and_differs_from_espeak():
    """Piper en_US-joe-medium (a data-only dependency): same text, same samples; a voice spec."""
    voice = tts.parse_voice("piper:en_US-joe-medium")
    assert voice == tts.PiperVoice("en_US-joe-medium")
    assert tts.parse_voice(tts.voice_spec(voice)) == voice == tts.voice_from_dict(voice.to_dict())
    x = tts.synthesize("It came from the left.", voice)
    assert np.array_equal(x, tts.synthesize("It came from the left.", voice))
    assert x.dtype == np.float32 and 0.8 < len(x) / SAMPLE_RATE < 3.0
    y = tts.synthesize("It came from the left.", tts.ESPEAK_AGENT_VOICE)
    n = min(len(x), len(y))
    assert np.abs(x[:n] - y[:n]).mean() > 0.01
    with pytest.raises(ValueError, match="PiperVoice.name"):
        tts.parse_voice("piper:en_US-nobody")
