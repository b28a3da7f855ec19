"""speech.vad: silero-vad streaming on real (espeak-ng) speech."""
import numpy as np
import pytest

from speech.vad import StreamingVAD, VADOptions
from tests.fixtures_audio import speech_clips  # noqa: F401  (pytest fixture)

SR = 16_000


def zeros(seconds):
    return np.zeros(int(seconds * SR), np.float32)


@pytest.fixture(scope="module")
def vad():
    return StreamingVAD()


@pytest.fixture(scope="module")
def conversation(speech_clips):
    """0.7 s silence, utterance a, 1 s silence, utterance b, 1.2 s silence; true bounds."""
    a, b = speech_clips
    x = np.concatenate([zeros(0.7), a, zeros(1.0), b, zeros(1.2)])
    ta, tb = len(a) / SR, len(b) / SR
    return x, [(0.7, 0.7 + ta), (1.7 + ta, 1.7 + ta + tb)]


def feed_in_chunks(vad, x, n):
    vad.reset()
    events = []
    for i in range(0, len(x), n):
        events += vad.feed(x[i:i + n])
    return events


def test_two_utterances_give_two_segments_at_the_right_times(vad, conversation):
    x, truth = conversation
    events = feed_in_chunks(vad, x, 16000)
    assert [e.kind for e in events] == ["start", "end", "start", "end"], events
    for (start, end), (t0, t1) in zip(zip(events[::2], events[1::2]), truth):
        assert abs(start.t - t0) <= 0.15, (start, t0)
        assert abs(end.t - t1) <= 0.15, (end, t1)
        assert start.prob >= 0.5 and end.prob < 0.35
    assert not vad.is_speech and vad.finish() == []


def test_chunked_equals_offline(vad, conversation):
    x, _ = conversation
    offline = feed_in_chunks(vad, x, len(x))
    probs_offline = vad.probs
    assert feed_in_chunks(vad, x, 100) == offline
    assert feed_in_chunks(vad, x, 16000) == offline
    assert feed_in_chunks(vad, x, 511) == offline
    assert len(probs_offline) == len(x) // 512 and vad.t == len(x) // 512 * 512 / SR


def test_later_input_never_changes_earlier_events(vad, conversation):
    x, _ = conversation
    full = feed_in_chunks(vad, x, 4000)
    for cut in (int(1.0 * SR), int(2.6 * SR), int(3.0 * SR), int(4.0 * SR)):
        prefix = feed_in_chunks(vad, x[:cut], 4000)
        assert prefix == full[:len(prefix)], cut


def test_end_fires_only_after_the_end_of_turn_silence(vad, conversation):
    x, _ = conversation
    vad.reset()
    fired_at = {}
    for i in range(0, len(x), 512):
        for e in vad.feed(x[i:i + 512]):
            fired_at.setdefault(e.kind, (e, (i + 512) / SR))
        if "start" in fired_at and "end" not in fired_at:
            assert vad.is_speech
    end, when = fired_at["end"]
    assert 0.4 <= when - end.t < 0.4 + 2 * 512 / SR, (end, when)
    start, when = fired_at["start"]
    assert 0.096 <= when - start.t < 0.096 + 2 * 512 / SR, (start, when)


def test_finish_closes_an_open_segment(vad, speech_clips):
    a, _ = speech_clips
    vad.reset()
    events = vad.feed(np.concatenate([zeros(0.5), a]))
    assert [e.kind for e in events] == ["start"] and vad.is_speech
    (end,) = vad.finish()
    assert end.kind == "end" and abs(end.t - (0.5 + len(a) / SR)) <= 0.15
    assert not vad.is_speech


def test_silence_and_a_beep_are_not_speech(vad):
    t = np.arange(int(0.25 * SR)) / SR
    beep = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    vad.reset()
    assert vad.feed(zeros(3.0)) == [] and max(vad.probs) < 0.5
    vad.reset()
    assert vad.feed(np.concatenate([zeros(0.5), beep, zeros(1.0)])) == []
    assert max(vad.probs) < 0.5 and not vad.is_speech


def test_padding_widens_segments(speech_clips):
    a, _ = speech_clips
    x = np.concatenate([zeros(0.7), a, zeros(1.0)])
    plain = feed_in_chunks(StreamingVAD(), x, 8000)
    padded = feed_in_chunks(StreamingVAD(VADOptions(speech_pad_ms=64)), x, 8000)
    assert padded[0].t == pytest.approx(plain[0].t - 0.064)
    assert padded[1].t == pytest.approx(plain[1].t + 0.064)


def test_options_and_input_are_validated(vad):
    with pytest.raises(ValueError, match="threshold"):
        VADOptions(threshold=1.5)
    with pytest.raises(ValueError, match="neg_threshold"):
        VADOptions(threshold=0.5, neg_threshold=0.7)
    with pytest.raises(ValueError, match="min_silence_ms"):
        VADOptions(min_silence_ms=-1)
    assert VADOptions().negative_threshold == pytest.approx(0.35)
    with pytest.raises(ValueError, match="to_mono"):
        vad.feed(np.zeros((1600, 2), np.float32))
    with pytest.raises(ValueError, match="pcm16_to_float"):
        vad.feed(np.zeros(1600, np.int16))
    assert vad.feed(np.zeros(0, np.float32)) == []


def test_a_closed_stream_hands_its_model_on():
    import numpy as np
    import speech.vad as vad
    a = vad.StreamingVAD()
    model = a._model
    a.close()
    assert model in vad._POOL                          # at once, not when a is collected
    assert a.feed(np.zeros(4096, np.float32)) == []    # audio after close is ignored
    b = vad.StreamingVAD()
    assert b._model is model and model not in vad._POOL
    b.close()
