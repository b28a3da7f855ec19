"""Turn taking with the end-of-turn predictor: a question resumed after a pause is one turn,
a discarded preemptive reply says nothing, the longest silence ends a turn the predictor never
calls complete, barge-in still stops a reply. Real silero-vad and espeak-ng speech, an
untrained tiny agent, and real TurnEndPredictors whose output the test sets through their
weights (head weights 0, bias +-20: P(complete) ~ 1 or ~ 0 whatever they hear)."""
import numpy as np
import pytest
import torch

from app.agent import random_agent
from app.engine import Engine, EngineOptions, with_generation
from app.frames import (AudioOut, Control, Interrupt, TextOut, TurnCandidate, TurnDone, TurnEnd,
                        TurnResumed)
from speech.constants import SAMPLE_RATE, TURN_END_THRESHOLD
from speech.tts import Voice, synthesize
from speech.turn_end import TurnEndConfig, TurnEndPredictor

CHUNK = SAMPLE_RATE // 50  # 20 ms, like a microphone callback
VOICE = Voice("en-us", None, 160, 50)


@pytest.fixture(scope="module")
def agent():
    return random_agent("tiny")


@pytest.fixture(scope="module")
def parts():
    """'What color is' ... 'the circle?': the two halves of a hesitant question."""
    head = synthesize("What color is", VOICE).astype(np.float32) * 0.5
    tail = synthesize("the circle?", VOICE).astype(np.float32) * 0.5
    return head, tail


def fixed_predictor(p_complete: bool) -> TurnEndPredictor:
    pred = TurnEndPredictor.new(TurnEndConfig(channels=8, hidden=8), seed=0)
    with torch.no_grad():
        pred.net.head.weight.zero_()
        pred.net.head.bias.fill_(20.0 if p_complete else -20.0)
    return pred


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("turn_end")
    return {k: str(fixed_predictor(k == "complete").save(d / f"{k}.safetensors"))
            for k in ("complete", "never")}


def silence(seconds):
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def feed(engine, pcm):
    for i in range(0, len(pcm), CHUNK):
        engine.push_audio(pcm[i:i + CHUNK])


def make(agent, model, threaded=False, audio_seconds=1.0, **kw):
    outs = []
    opts = EngineOptions(threaded=threaded, turn_end_model=model, **kw)
    opts = with_generation(opts, max_text_tokens=4, max_audio_seconds=audio_seconds,
                           min_audio_seconds=audio_seconds)
    return Engine(agent, outs.append, opts), outs


def of(outs, kind):
    return [o for o in outs if isinstance(o, kind)]


@pytest.mark.parametrize("threaded,preempt", [(False, 0.1), (True, 0.1), (False, None)])
def test_question_resumed_after_a_pause_is_one_turn(agent, parts, models, threaded, preempt):
    head, tail = parts
    eng, outs = make(agent, models["never"], threaded=threaded, preemptive_pause=preempt)
    feed(eng, silence(0.5))
    feed(eng, head)
    feed(eng, silence(0.7))                 # the pause: a candidate at 0.2 s, P ~ 0
    assert eng.segmenter.pending is not None
    feed(eng, tail)
    feed(eng, silence(1.6))                 # P ~ 0 again: the longest silence (1.2 s) ends it
    eng.wait_idle(30)
    feed(eng, silence(0.1))
    ends, done = of(outs, TurnEnd), of(outs, TurnDone)
    assert len(ends) == 1 and len(done) == 1, [type(o).__name__ for o in outs]
    e, m = ends[0], done[0].metrics
    q_end = 0.5 + (len(head) + len(tail)) / SAMPLE_RATE + 0.7
    assert abs(e.speech_start - 0.5) < 0.2          # the first word's start
    assert abs(e.speech_end - q_end) < 0.2
    assert e.reason == "max_silence" and e.discarded == 1
    assert e.t - e.speech_end == pytest.approx(1.2, abs=0.05)
    assert (m.turn_end, m.discarded_starts, m.speech_start) == ("max_silence", 1, e.speech_start)
    assert not of(outs, Interrupt)                   # resuming is not a barge-in
    assert not of(outs, TurnCandidate) and not of(outs, TurnResumed)  # engine-internal
    eng.close()


@pytest.mark.parametrize("threaded,preempt", [(False, 0.1), (True, 0.1), (True, None)])
def test_discarded_preemptive_reply_emits_nothing(agent, parts, models, threaded, preempt):
    head, tail = parts
    eng, outs = make(agent, models["never"], threaded=threaded, preemptive_pause=preempt)
    feed(eng, silence(0.5))
    feed(eng, head)
    feed(eng, silence(0.7))                 # a held reply starts at the pause ...
    feed(eng, tail)                         # ... and is dropped when the user goes on
    feed(eng, silence(0.6))                 # a second held reply, not committed yet
    eng.wait_idle(30)                       # (held replies may finish: still nothing out)
    assert not of(outs, TextOut) and not of(outs, AudioOut) and not of(outs, TurnDone)
    assert not of(outs, TurnEnd) and not of(outs, Interrupt)
    feed(eng, silence(1.0))                 # the longest silence commits the second one
    eng.wait_idle(30)
    feed(eng, silence(0.1))
    (te,) = of(outs, TurnEnd)
    first = outs.index(te)
    replies = [i for i, o in enumerate(outs) if isinstance(o, (TextOut, AudioOut, TurnDone))]
    assert replies and min(replies) > first          # nothing before the decision
    audio = of(outs, AudioOut)
    assert all(a.t >= te.t for a in audio)
    # one reply's audio (1.0 s), not two: the dropped one never reached on_output
    assert sum(len(a.pcm) for a in audio) == pytest.approx(agent.codec.sample_rate * 1.0, rel=0.05)
    assert [a.offset for a in audio] == sorted({a.offset for a in audio})
    (done,) = of(outs, TurnDone)
    m = done.metrics
    assert m.first_audio == audio[0].t and m.first_audio >= m.decision
    assert m.response_latency == pytest.approx(m.first_audio - m.speech_end)
    eng.close()


def test_predictor_complete_answers_at_the_short_pause(agent, parts, models):
    head, tail = parts
    eng, outs = make(agent, models["complete"])
    feed(eng, silence(0.5))
    feed(eng, np.concatenate([head, tail]))
    feed(eng, silence(0.3))                 # 0.2 s of silence suffices
    (te,) = of(outs, TurnEnd)
    assert te.reason == "predictor" and te.discarded == 0 and te.probability > 0.99
    assert te.t - te.speech_end < 0.35      # the fixed rule waits 0.4 s (+ VAD delay)
    eng.wait_idle(30)
    (done,) = of(outs, TurnDone)
    assert done.metrics.turn_end == "predictor"
    eng.close()


def test_pause_then_complete_is_one_predictor_turn(agent, parts, models):
    """Not complete at the inner pause, complete at the end: one turn, one discarded start."""
    head, tail = parts
    eng, outs = make(agent, models["never"])
    feed(eng, silence(0.5))
    feed(eng, head)
    feed(eng, silence(0.6))
    eng.segmenter.predictor = fixed_predictor(True)
    feed(eng, tail)
    feed(eng, silence(0.4))
    (te,) = of(outs, TurnEnd)
    assert (te.reason, te.discarded) == ("predictor", 1) and abs(te.speech_start - 0.5) < 0.2
    (done,) = of(outs, TurnDone)
    assert (done.metrics.turn_end, done.metrics.discarded_starts) == ("predictor", 1)
    eng.close()


def test_threshold_one_leaves_the_decision_to_the_longest_silence(agent, parts, models):
    head, tail = parts
    eng, outs = make(agent, models["never"], turn_end_threshold=1.0, max_end_of_turn_silence=0.8)
    feed(eng, silence(0.5))
    feed(eng, np.concatenate([head, tail]))
    feed(eng, silence(0.7))
    assert not of(outs, TurnEnd)
    feed(eng, silence(0.3))
    (te,) = of(outs, TurnEnd)
    assert te.reason == "max_silence" and te.t - te.speech_end == pytest.approx(0.8, abs=0.05)
    eng.close()


def test_barge_in_still_stops_a_reply(agent, parts, models):
    head, tail = parts
    question = np.concatenate([head, tail])
    eng, outs = make(agent, models["complete"], threaded=True, audio_seconds=30.0)
    feed(eng, silence(0.5))
    feed(eng, question)
    feed(eng, silence(0.5))                 # turn ends at the pause; the reply starts
    assert of(outs, TurnEnd)
    feed(eng, question)                     # the user talks over the reply
    interrupts = [i for i, o in enumerate(outs) if isinstance(o, Interrupt)]
    assert interrupts and outs[interrupts[0]].reason == "barge-in"
    eng.wait_idle(10)
    assert not any(isinstance(o, AudioOut) and o.turn == 1 for o in outs[interrupts[0]:])
    done = [o for o in outs if isinstance(o, TurnDone) and o.metrics.turn == 1]
    assert done and done[0].metrics.interrupted and done[0].metrics.reply_seconds < 30.0
    eng.close()


def test_reset_drops_a_pending_turn(agent, parts, models):
    head, _ = parts
    eng, outs = make(agent, models["never"])
    feed(eng, silence(0.5))
    feed(eng, head)
    feed(eng, silence(0.4))
    assert eng.segmenter.pending is not None
    eng.push(Control(eng.now, "reset"))
    feed(eng, silence(1.5))
    assert not of(outs, TurnEnd) and not of(outs, AudioOut) and not of(outs, TextOut)
    assert eng.settled()
    eng.close()


def test_turn_end_options_are_validated():
    for kw, word in [({"turn_end_threshold": 0.0}, "turn_end_threshold"),
                     ({"turn_end_threshold": 1.5}, "turn_end_threshold"),
                     ({"turn_end_pause": 0.0}, "turn_end_pause"),
                     ({"max_end_of_turn_silence": 0.1}, "max_end_of_turn_silence"),
                     ({"turn_end_model": ""}, "turn_end_model")]:
        with pytest.raises(ValueError, match=word):
            EngineOptions(**kw)
    o = EngineOptions()
    assert o.turn_end_model is None and o.shortest_turn_silence == o.end_of_turn_silence
    o = EngineOptions(turn_end_model="x.safetensors")
    assert (o.shortest_turn_silence, o.longest_turn_silence) == (0.1, 1.2)
    o = EngineOptions(turn_end_model="x.safetensors", preemptive_pause=None)
    assert (o.shortest_turn_silence, o.longest_turn_silence) == (0.2, 1.2)
    with pytest.raises(ValueError, match="preemptive_pause"):
        EngineOptions(preemptive_pause=0.3)


@pytest.mark.parametrize("threaded", [False, True])
def test_earlier_preemptive_start_still_asks_at_the_turn_end_pause(agent, parts, models, threaded):
    """preemptive_pause 0.1 s: the held reply starts at 0.1 s of silence, the predictor is
    asked at 0.2 s; a pause inside the question still gives one turn."""
    head, tail = parts
    eng, outs = make(agent, models["never"], threaded=threaded, preemptive_pause=0.1)
    feed(eng, silence(0.5))
    feed(eng, head)
    started = asked = None                  # silence heard when the reply starts / P is asked
    for i in range(30):
        feed(eng, silence(0.02))
        c = eng.segmenter.pending
        if c is not None and started is None:
            started = eng.now - c.speech_end
        if c is not None and c.probability is not None and asked is None:
            asked = eng.now - c.speech_end
    assert started is not None and asked is not None
    assert 0.1 - 1e-6 <= started < asked and asked == pytest.approx(0.2, abs=0.021)
    eng.segmenter.predictor = fixed_predictor(True)
    feed(eng, tail)
    feed(eng, silence(0.5))
    eng.wait_idle(30)
    feed(eng, silence(0.1))
    (te,) = of(outs, TurnEnd)
    assert te.reason == "predictor" and te.discarded == 1 and abs(te.speech_start - 0.5) < 0.2
    assert te.t - te.speech_end >= 0.2 - 1e-6
    (done,) = of(outs, TurnDone)
    audio = of(outs, AudioOut)
    assert audio and all(a.t >= te.t for a in audio) and done.metrics.first_audio == audio[0].t
    assert min(i for i, o in enumerate(outs) if isinstance(o, (TextOut, AudioOut))) > outs.index(te)
    eng.close()


def test_the_pause_is_left_out_of_the_question(agent, parts, models):
    """The engine records the pause it listened through; the question the model hears is the
    speech without it (the same features as the question spoken without a pause). The VAD
    confirms the resumed speech late (silero: +0.08 s mean), so, as at the question's start,
    the cut keeps question_pad s before that restart."""
    from fusion.inputs import SceneEncoder
    head, tail = parts
    eng, outs = make(agent, models["never"])
    asked = []
    features = eng.scene.features
    eng.scene.features = lambda q0, q1, gaps=(): asked.append(list(gaps)) or features(q0, q1, gaps)
    feed(eng, silence(0.5))
    feed(eng, head)
    feed(eng, silence(0.7))
    feed(eng, tail)
    feed(eng, silence(1.5))
    (te,) = of(outs, TurnEnd)
    (p0, p1), = te.pauses
    h1 = 0.5 + len(head) / SAMPLE_RATE
    assert h1 - 0.2 < p0 < h1 + 0.1 and h1 + 0.6 < p1 < h1 + 0.8
    assert asked and asked[-1] == [(p0, pytest.approx(p1 - eng.options.question_pad))]
    pcm = np.concatenate([silence(1.0), head, silence(0.7), tail, silence(0.3)])
    enc = SceneEncoder(agent.model)
    enc.push_audio(pcm)
    a0, a1 = 1.0 + len(head) / SAMPLE_RATE, 1.0 + len(head) / SAMPLE_RATE + 0.7
    q1 = a1 + len(tail) / SAMPLE_RATE
    cut = enc.features(0.9, q1, gaps=[(a0, a1)])
    ref = SceneEncoder(agent.model)
    ref.push_audio(np.concatenate([silence(1.0), head, tail]))
    whole = ref.features(0.9, q1 - 0.7)
    assert cut.question.shape == whole.question.shape
    assert np.allclose(cut.question.numpy(), whole.question.numpy(), atol=1e-4)
    eng.close()


def test_the_pause_is_left_out_of_chunked_questions(agent, parts):
    from fusion.config import preset
    from fusion.inputs import SceneEncoder
    from fusion.model import FusionModel
    head, tail = parts
    torch.manual_seed(0)
    enc = SceneEncoder(FusionModel(preset("tiny", agent.codec.spec, question_chunks=True)).eval())
    enc.push_audio(np.concatenate([silence(1.0), head, silence(0.7), tail, silence(0.3)]))
    a0 = 1.0 + len(head) / SAMPLE_RATE
    q1 = a0 + 0.7 + len(tail) / SAMPLE_RATE
    full, cut = enc.features(0.9, q1), enc.features(0.9, q1, gaps=[(a0, a0 + 0.7)])
    assert full.question.shape[1] - cut.question.shape[1] == pytest.approx(0.7 * 50, abs=2)


def test_turn_end_flags(tmp_path, capsys):
    import argparse
    from app.engine import DEFAULT_TURN_END_MODEL
    from app.turn_end_args import add_turn_end_arguments, turn_end_kwargs
    p = argparse.ArgumentParser()
    add_turn_end_arguments(p)
    kw = turn_end_kwargs(p.parse_args(["--turn-end", "silence", "--max-silence", "1.0"]))
    assert kw["turn_end_model"] is None and kw["max_end_of_turn_silence"] == 1.0
    kw = turn_end_kwargs(p.parse_args([]))
    assert kw["turn_end_model"] == (str(DEFAULT_TURN_END_MODEL) if DEFAULT_TURN_END_MODEL.is_file() else None)
    assert EngineOptions(**kw).turn_end_threshold == TURN_END_THRESHOLD == 0.5
    with pytest.raises(FileNotFoundError, match="no end-of-turn model"):
        turn_end_kwargs(p.parse_args(["--turn-end", str(tmp_path / "missing.safetensors")]))
