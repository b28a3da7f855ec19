"""Session engine: a spoken question through VAD -> turn -> reply, barge-in, half duplex,
bounded memory. Real silero-vad and espeak-ng speech; an untrained tiny agent."""
import time

import numpy as np
import pytest

from app.agent import random_agent
from app.engine import Engine, EngineOptions, with_generation
from fusion.generator import PCMChunk
from app.frames import AudioOut, Control, Interrupt, SpeechStart, TextOut, TurnDone, TurnEnd
from speech.constants import SAMPLE_RATE
from speech.tts import Voice, synthesize

CHUNK = SAMPLE_RATE // 50  # 20 ms, like a microphone callback


@pytest.fixture(scope="module")
def agent():
    return random_agent("tiny")


@pytest.fixture(scope="module")
def question():
    return synthesize("What color is the circle?", Voice("en-us", None, 160, 50)).astype(np.float32) * 0.5


def silence(seconds):
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def feed(engine, pcm, frame=None):
    for i in range(0, len(pcm), CHUNK):
        engine.push_audio(pcm[i:i + CHUNK])
        if frame is not None and i % (SAMPLE_RATE // 10) < CHUNK:
            engine.push_frame(frame)


def make(agent, threaded, **kw):
    outs = []
    opts = EngineOptions(threaded=threaded, **kw)
    opts = with_generation(opts, max_text_tokens=4, max_audio_seconds=1.0, min_audio_seconds=1.0)
    return Engine(agent, outs.append, opts), outs


@pytest.mark.parametrize("threaded", [False, True])
def test_spoken_question_gets_a_reply_with_metrics(agent, question, threaded):
    eng, outs = make(agent, threaded)
    frame = np.full((240, 320, 3), 40, np.uint8)
    feed(eng, silence(1.0), frame)
    feed(eng, question, frame)
    feed(eng, silence(1.0), frame)
    eng.wait_idle(30)
    feed(eng, silence(0.1))
    ends = [o for o in outs if isinstance(o, TurnEnd)]
    done = [o for o in outs if isinstance(o, TurnDone)]
    assert len(ends) == 1 and len(done) == 1, [type(o).__name__ for o in outs]
    e, m = ends[0], done[0].metrics
    q_end = 1.0 + len(question) / SAMPLE_RATE
    assert abs(e.speech_end - q_end) < 0.2 and abs(e.speech_start - 1.0) < 0.2
    assert e.t - e.speech_end >= eng.options.end_of_turn_silence - 0.05
    audio = [o for o in outs if isinstance(o, AudioOut)]
    assert sum(len(a.pcm) for a in audio) == pytest.approx(agent.codec.sample_rate * 1.0, rel=0.05)
    assert np.concatenate([a.pcm for a in audio]).std() > 1e-4  # non-silent
    assert any(isinstance(o, TextOut) for o in outs)
    assert m.first_audio == audio[0].t
    assert m.response_latency == pytest.approx(m.first_audio - m.speech_end)
    assert m.compute_latency > 0 and m.response_latency > m.compute_latency
    assert m.generation_rtf > 0 and not m.interrupted
    eng.close()


def slow_generator(eng):
    """Makes the reply's generator slow: after its first audio chunk it waits (up to 10 s) until
    the reply is cancelled, so a barge-in lands while the reply is playing and has more to say.
    Returns counters: events the engine pulled after the cancel, audio chunks pulled."""
    gen, run = eng.reply.generator, eng.reply.generator.run
    seen = {"after_cancel": 0, "chunks": 0}

    def slow_run(prefix, **kw):
        cancel = eng.reply._reply.cancel          # this reply's cancel event
        for ev in run(prefix, **kw):
            seen["after_cancel"] += cancel.is_set()
            yield ev
            if isinstance(ev, PCMChunk):
                seen["chunks"] += 1
                if seen["chunks"] == 1:
                    cancel.wait(10)
    gen.run = slow_run
    return seen


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["barge-in", "control"])
def test_barge_in_stops_reply_and_drops_audio(agent, question, how):
    """The user talks over a reply that is playing and has more to say: the reply stops at
    once (the generator is not run on after the cancel), no audio of it follows the
    Interrupt, and its metrics say interrupted."""
    outs = []
    opts = with_generation(EngineOptions(threaded=True), max_text_tokens=4, max_audio_seconds=30.0,
                           min_audio_seconds=30.0)
    eng = Engine(agent, outs.append, opts)
    seen = slow_generator(eng)
    feed(eng, silence(0.5))
    feed(eng, question)
    feed(eng, silence(0.8))                 # turn ends; the reply starts
    assert any(isinstance(o, TurnEnd) for o in outs)
    wait_for(lambda: any(isinstance(o, AudioOut) for o in list(outs)), 30, "the reply's first audio")
    if how == "barge-in":
        feed(eng, question)                 # the user talks over the reply
    else:
        eng.push(Control(eng.now, "interrupt"))
    interrupts = [i for i, o in enumerate(outs) if isinstance(o, Interrupt)]
    assert interrupts and outs[interrupts[0]].reason == how
    eng.wait_idle(10)
    r = eng.reply._reply
    assert r is None or r.thread is None or not r.thread.is_alive()
    before, after = outs[:interrupts[0]], outs[interrupts[0]:]
    assert any(isinstance(o, AudioOut) and o.turn == 1 for o in before)  # it was speaking
    assert not any(isinstance(o, AudioOut) and o.turn == 1 for o in after)
    # a cancelled reply pulls at most the one event in flight from its generator
    assert seen["after_cancel"] <= 1, seen
    done = [o for o in outs if isinstance(o, TurnDone) and o.metrics.turn == 1]
    assert done and done[0].metrics.interrupted
    sent = sum(len(o.pcm) for o in before if isinstance(o, AudioOut)) / agent.codec.sample_rate
    assert done[0].metrics.reply_seconds == pytest.approx(sent)  # what went out, no more
    assert seen["chunks"] == sum(isinstance(o, AudioOut) for o in before)
    eng.close()


def test_speech_shorter_than_a_turn_is_not_a_turn(agent, question):
    """A 0.2 s burst (a cough, a click, half a word) is heard by the VAD but ends no turn."""
    n = int(0.2 * SAMPLE_RATE)
    energy = np.convolve(question ** 2, np.ones(n), "valid")
    burst = question[int(np.argmax(energy)):][:n]             # the loudest 0.2 s of speech
    eng, outs = make(agent, threaded=False)
    feed(eng, silence(0.5))
    feed(eng, burst)
    feed(eng, silence(1.0))
    kinds = [type(o).__name__ for o in outs]
    assert "SpeechStart" in kinds and "SpeechEnd" in kinds, kinds
    assert "TurnEnd" not in kinds and "TurnDone" not in kinds, kinds
    eng.close()


def test_half_duplex_mutes_mic_while_agent_speaks(agent, question):
    eng, outs = make(agent, threaded=False, half_duplex=True)
    feed(eng, silence(0.5))
    feed(eng, question)
    feed(eng, silence(0.6))
    assert len([o for o in outs if isinstance(o, TurnEnd)]) == 1
    n_starts = len([o for o in outs if isinstance(o, SpeechStart)])
    feed(eng, question[: SAMPLE_RATE // 2])  # talking while the 1 s reply plays: muted
    assert len([o for o in outs if isinstance(o, SpeechStart)]) == n_starts
    assert not any(isinstance(o, Interrupt) for o in outs)
    eng.close()


def test_control_interrupt_and_reset(agent, question):
    eng, outs = make(agent, threaded=False)
    feed(eng, silence(0.3))
    eng.push(Control(eng.now, "interrupt"))
    assert isinstance(outs[-1], Interrupt) and outs[-1].reason == "control"
    eng.push(Control(eng.now, "reset"))
    assert len(eng.scene.audio_ring) == 0


def test_memory_is_bounded_over_a_long_session(agent):
    eng, _ = make(agent, threaded=False)
    frame = np.zeros((240, 320, 3), np.uint8)
    feed(eng, silence(25.0), frame)
    sizes = (eng.scene.audio_ring.nbytes, eng.scene.frame_ring.nbytes, eng.scene._pcm.nbytes,
             len(eng.scene.audio_ring), len(eng.scene.frame_ring))
    feed(eng, silence(20.0), frame)
    assert (eng.scene.audio_ring.nbytes, eng.scene.frame_ring.nbytes, eng.scene._pcm.nbytes,
            len(eng.scene.audio_ring), len(eng.scene.frame_ring)) == sizes


def test_bad_audio_gets_a_clear_error_and_loses_nothing(agent):
    eng, _ = make(agent, threaded=False)
    eng.push_audio(silence(0.5))
    with pytest.raises(ValueError, match="mono"):
        eng.push_audio(np.zeros((320, 2), np.float32))
    with pytest.raises(ValueError, match="resample"):
        eng.push_audio(silence(0.1), sample_rate=44100)
    eng.push_audio(np.zeros(0, np.float32))  # an empty chunk is a no-op
    with pytest.raises(ValueError, match="NaN"):
        eng.push_audio(np.full(320, np.nan, np.float32))
    assert eng.now == pytest.approx(0.5)  # nothing half-pushed
    eng.push_audio(silence(0.5))
    assert eng.now == pytest.approx(1.0)


def test_options_are_validated():
    with pytest.raises(ValueError, match="end_of_turn_silence"):
        EngineOptions(end_of_turn_silence=0.0)
    with pytest.raises(ValueError, match="vad_threshold"):
        EngineOptions(vad_threshold=1.5)
    assert EngineOptions().end_of_turn_silence <= 0.4


def test_scene_features_streaming_equals_one_shot(agent, question):
    """Pushing audio in 20 ms pieces or all at once encodes the same context."""
    from fusion.inputs import SceneEncoder
    pcm = np.concatenate([silence(2.3), question, silence(0.4)])
    a, b = SceneEncoder(agent.model), SceneEncoder(agent.model)
    for i in range(0, len(pcm), CHUNK):
        a.push_audio(pcm[i:i + CHUNK])
    b.push_audio(pcm)
    q1 = 2.3 + len(question) / SAMPLE_RATE
    fa, fb = a.features(2.2, q1), b.features(2.2, q1)
    for k in ("question", "audio", "audio_times"):
        assert np.allclose(getattr(fa, k).numpy(), getattr(fb, k).numpy(), atol=1e-5), k
    # causality: audio after q1 does not change the turn's features
    c = SceneEncoder(agent.model)
    c.push_audio(np.concatenate([pcm, np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32)]))
    fc = c.features(2.2, q1)
    assert np.allclose(fa.question.numpy(), fc.question.numpy(), atol=1e-5)
    n = fa.audio.shape[1] - 50  # chunks completed before q1 are identical
    assert np.allclose(fa.audio[:, :n].numpy(), fc.audio[:, :n].numpy(), atol=1e-5)

