"""The demo-world scene source (app/demo_scene.py): frames are the world's rendering of the
shown scene, beeps sound when the scene says (and repeat), new scenes come on request and on
the timer, the example questions have answers in that scene. No model, no devices."""
import numpy as np
import pytest

from app.demo_scene import (MIN_BEEPS_EVERY, DemoScene, DemoSceneOptions, SoundCursor,
                            questions_markdown, world_markdown)
from demo import world as W
from speech.constants import SAMPLE_RATE


def beeping(seed_from: int = 0, **kw) -> DemoScene:
    """A DemoScene whose first scene beeps (seeds tried in order)."""
    for seed in range(seed_from, seed_from + 50):
        ds = DemoScene(DemoSceneOptions(seed=seed, **kw))
        if ds.shown(0.0).scene.beeps:
            return ds
    raise AssertionError("no beeping scene in 50 seeds")


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def test_frames_are_the_worlds_rendering_at_the_camera_rate():
    ds = beeping(fps=10.0)
    s = ds.shown(0.0)
    b = s.scene.beeps[0]
    for t in (0.0, 0.55, b.t0 + 0.01, b.t0 + 0.05, 4.0):
        tf = np.floor(t * 10) / 10
        want = W.render_frame(ds.scene_at(t), tf)
        got = ds.frame(t)
        assert got.shape == (240, 320, 3) and got.dtype == np.uint8
        assert np.array_equal(got, want), t
    # the sounding object pulses while it beeps: the frame during a beep differs from
    # the frame before the beeps, and equals the world's picture of the pulsing scene
    during = ds.frame(b.t0 + 0.1)
    assert np.abs(during.astype(int) - ds.frame(0.0).astype(int)).sum() > 0
    assert W.active_pulse(ds.scene_at(b.t0 + 0.1), s.scene.sound_slot,
                          ds.frame_time(b.t0 + 0.1)) is not None


def test_beeps_sound_when_the_scene_says_and_repeat():
    o = dict(beeps_after=1.0, beeps_every=8.0, scene_seconds=0)
    ds = beeping(**o)
    scene = ds.shown(0.0).scene
    sr = SAMPLE_RATE
    audio = ds.audio(0, 20 * sr)
    assert audio.dtype == np.float32 and len(audio) == 20 * sr
    for cycle in (0, 1, 2):
        for b in scene.beeps:
            a = int(round((b.t0 + 8.0 * cycle) * sr))
            seg = audio[a:a + int(b.dur * sr)]
            # a sine at the beep's peak level (10 ms fades): RMS close to peak / sqrt(2)
            assert rms(seg) == pytest.approx(10 ** (b.level_dbfs / 20) / np.sqrt(2), rel=0.1)
            spec = np.abs(np.fft.rfft(seg))
            assert abs(np.argmax(spec) * sr / len(seg) - b.freq) < 10
    assert rms(audio[:int(0.99 * sr)]) == 0.0                 # silent before beeps_after
    last = scene.beeps[-1]
    gap = audio[int((last.t0 + last.dur) * sr) + 2:int((scene.beeps[0].t0 + 8.0) * sr) - 2]
    assert rms(gap) == 0.0                                    # silent between the runs
    # reading in pieces gives the same stream (the agent's and the speaker's reads agree)
    pieces = np.concatenate([ds.audio(i, 1600) for i in range(0, 20 * sr, 1600)])
    assert np.array_equal(pieces, audio)
    mic = np.full(1600, 0.01, np.float32)
    i0 = int(round(scene.beeps[0].t0 * sr))
    assert np.allclose(ds.hear(i0, mic), mic + audio[i0:i0 + 1600], atol=1e-6)


def test_a_silent_scene_is_silent():
    for seed in range(50):
        ds = DemoScene(DemoSceneOptions(seed=seed, scene_seconds=0))
        if not ds.shown(0.0).scene.beeps:
            assert not ds.audio(0, 20 * SAMPLE_RATE).any()
            assert ds.shown(0.0).description.endswith("silent.")
            return
    raise AssertionError("no silent scene in 50 seeds")


def test_new_scene_on_request_and_on_the_timer():
    ds = DemoScene(DemoSceneOptions(seed=3, scene_seconds=20.0))
    first = ds.shown(0.0)
    assert ds.shown(19.9) is first and ds.shown(20.0).index == 1 and ds.shown(20.0).start == 20.0
    s2 = ds.new_scene(25.0)                                   # the button
    assert s2.index == 2 and s2.start == 25.0 and ds.shown(25.0) is s2
    assert ds.shown(24.99).index == 1                          # the past stays as it was
    assert ds.shown(44.99) is s2 and ds.shown(45.0).index == 3   # the timer restarts
    assert np.array_equal(ds.frame(25.0), W.render_frame(s2.scene, 25.0))
    # beeps follow the new scene: they start beeps_after s after the request
    with_beeps = next(i for i in range(100) if ds.new_scene(100.0 + 30 * i).scene.beeps)
    s = ds.shown(100.0 + 30 * with_beeps)
    assert s.scene.beeps[0].t0 == pytest.approx(s.start + 1.0)
    a = int(round(s.scene.beeps[0].t0 * SAMPLE_RATE))
    assert rms(ds.audio(a, 800)) > 0.01 and rms(ds.audio(a - 1600, 1500)) == 0.0
    # no timer: the scene stays until asked
    still = DemoScene(DemoSceneOptions(seed=3, scene_seconds=0))
    assert still.shown(1000.0).index == 0


def test_a_new_scene_cuts_the_old_scenes_later_beeps():
    ds = beeping(scene_seconds=0)
    end = ds.shown(0.0).scene.beeps[-1]
    t_new = end.t0 + end.dur + 0.5                       # after the first run
    new = ds.new_scene(t_new)
    heard = ds.beeps(0.0, 30.0)
    olds = [b for b in heard if b.freq == end.freq and b.t0 < t_new]
    assert len(olds) == len(ds.shown(0.0).scene.beeps)   # the first run only
    assert all(b.t0 >= t_new for b in heard if b not in olds)
    want = [b.t0 + 8.0 * k for k in range(4) for b in new.scene.beeps if b.t0 + 8.0 * k < 30]
    assert sorted(b.t0 for b in heard if b not in olds) == pytest.approx(sorted(want))


def test_example_questions_have_answers_in_the_shown_scene():
    ds = DemoScene(DemoSceneOptions(seed=11, scene_seconds=10.0, n_examples=4))
    kinds = set()
    for k in range(12):
        s = ds.shown(10.0 * k)
        assert 1 <= len(s.examples) <= 4
        for q in s.examples:
            assert q in [W.worded(c, "v2") for c in W.candidate_questions(s.scene, q.qtype)]
            kinds.add(q.type_group)
        assert len({q.qtype for q in s.examples}) == len(s.examples)
        for o in s.scene.objects:
            assert f"{o.color} {o.shape}" in s.description
    assert kinds == {"visual", "audio", "audio-visual"}


def test_examples_are_worded_in_the_pages_version():
    """Version 2 (the shipped model's) asks "What shape is in the middle?"; version 1 "on"."""
    def texts(version):
        ds = DemoScene(DemoSceneOptions(seed=3, scene_seconds=10.0, n_examples=11, version=version))
        return {q.text for k in range(40) for q in ds.shown(10.0 * k).examples}
    v1, v2 = texts("v1"), texts("v2")
    assert "What shape is on the middle?" in v1 and "What shape is in the middle?" not in v1
    assert "What shape is in the middle?" in v2 and "What shape is on the middle?" not in v2
    assert DemoSceneOptions().version == "v2"
    with pytest.raises(ValueError, match="version must be one of"):
        DemoSceneOptions(version="v3")


def test_options_say_what_to_do():
    with pytest.raises(ValueError, match="beeps_every must be 0"):
        DemoSceneOptions(beeps_every=3.0)
    with pytest.raises(ValueError, match="scene_seconds must be 0"):
        DemoSceneOptions(scene_seconds=1.0)
    with pytest.raises(ValueError, match="split must be"):
        DemoSceneOptions(split="dev")
    assert DemoSceneOptions(beeps_every=MIN_BEEPS_EVERY).beeps_every == MIN_BEEPS_EVERY


def test_the_page_texts_come_from_the_world():
    text = questions_markdown()
    for group, template, _ in W.QTYPES.values():
        assert template.split(" {")[0].split("?")[0] in text
    assert "Which object made the sound?" in text and "left/middle/right" in text
    assert "demo world" in world_markdown() and "beeps" in world_markdown()


def test_sound_cursor_follows_the_session_clock():
    """A speaker playing at its own pace (the browser's player) gets the scene's sound at the
    session clock: contiguous while in step, jumping back into step when it drifts."""
    ds = beeping(scene_seconds=0)
    b = ds.shown(0.0).scene.beeps[0]
    cur = SoundCursor(ds, 24_000)                 # another rate: the agent voice's
    n = 2400                                      # 0.1 s
    before = [cur.next(n, clock=0.1 * k) for k in range(int(b.t0 / 0.1) + 3)]
    played = np.concatenate(before)
    assert np.array_equal(played, ds.audio(0, len(played), 24_000))
    assert rms(played[int(b.t0 * 24_000):int((b.t0 + 0.2) * 24_000)]) > 0.01
    # the session clock stalls (no microphone audio): playback waits within `resync`
    pos = cur.pos
    for _ in range(10):
        cur.next(n, clock=1.0)
    assert cur.pos <= int(1.5 * 24_000) + n and cur.pos != pos + 10 * n
