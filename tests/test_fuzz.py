"""A standing fuzz and churn run against a real server on 127.0.0.1 (tiny random agent):
every attack of lab/soak.py, connection churn and disconnects mid-reply, while a
well-behaved session beside them must get every reply. Bounded in count; every wait has a
generous deadline (a correctness check, not a latency target: `run.py bench --soak`
measures latency and memory)."""
from __future__ import annotations

import asyncio
import gc

import pytest

from app import protocol as P
from app.agent import random_agent
from app.server import ServerOptions, ServerThread
from lab import attack as soak


@pytest.fixture(scope="module")
def agent():
    return random_agent("tiny")


@pytest.fixture(scope="module")
def question():
    return soak.question_audio()


EXPECTED = {
    "unknown_kind": {P.UNKNOWN_KIND}, "empty": {P.BAD_MESSAGE}, "text_frame": {P.BAD_MESSAGE},
    "wrong_direction": {P.WRONG_DIRECTION}, "odd_pcm": {P.BAD_AUDIO},
    "truncated_jpeg": {P.BAD_VIDEO}, "undecodable_jpeg": {P.BAD_VIDEO},
    "huge_jpeg_header": {P.BAD_VIDEO}, "truncated_json": {P.BAD_JSON},
    "nested_event": {P.BAD_JSON}, "unknown_event": {P.BAD_EVENT}, "bad_action": {P.BAD_EVENT},
    "second_handshake": {P.BAD_HANDSHAKE}, "oversized_audio": {P.TOO_LARGE},
    "oversized_event": {P.TOO_LARGE}, "over_max_size": {P.TOO_LARGE},
    "nested_handshake": {P.BAD_JSON}, "float_protocol": {P.BAD_HANDSHAKE},
    "rate_too_high": {P.BAD_HANDSHAKE}, "not_json": {P.BAD_JSON}, "media_first": {P.BAD_HANDSHAKE},
    "rate_8003": {8003}, "rate_11025": {11025}, "rate_47999": {47999},
    "origin_http://evil.example": {"403"}, "origin_null": {"403"}, "truncated_frame": {"101"},
    "raw_garbage": {"sent"}, "disconnect_mid_reply": {"reply started"},
}


def test_fuzz_and_churn_beside_a_conversation(agent, question):
    opts = ServerOptions(port=0, max_sessions=16, max_message_bytes=256 * 1024)
    with ServerThread(agent, opts) as s:
        limits = s.server.options.limits

        async def main():
            talk = asyncio.create_task(soak.talk(s.ws_url, question, turns=2, deadline=60))
            fuzz = asyncio.create_task(soak.fuzz(s.ws_url, limits, opts.max_message_bytes,
                                                 rounds=2, question=question))
            churned = await soak.churn(s.ws_url, 40)
            results = await asyncio.gather(talk, fuzz)
            await soak.wait_idle(s.url, 60)
            return (*results, churned)

        talk, fuzz, churned = asyncio.run(main())
        assert soak.health(s.url) == {"status": "ok", "sessions": 0, "max_sessions": 16,
                                      "model": "random-tiny"}
    # the conversation: every reply arrived, without an error
    assert talk.turns_sent == 2 and [m["turn"] for m in talk.metrics] == [1, 2]
    assert len(talk.latencies) == 2 and not talk.errors
    assert all(m["reply_seconds"] > 0.1 and not m["interrupted"] for m in talk.metrics)
    # the attacker: every malformed message answered with its protocol error, never "internal"
    assert not fuzz.unanswered and fuzz.internal == 0
    codes = {case: codes for case, codes in fuzz.codes.items() if case != "garbage"}
    assert codes == EXPECTED
    assert fuzz.codes["garbage"] <= {P.UNKNOWN_KIND, P.WRONG_DIRECTION, P.BAD_JSON, P.BAD_AUDIO,
                                     P.BAD_VIDEO, P.BAD_HANDSHAKE, P.BAD_EVENT, P.BAD_MESSAGE}
    assert churned == 40


def test_closed_sessions_leave_nothing_behind(agent):
    """After sessions end, none of their objects (session, engine, worker) stays alive:
    what churn used to keep is released (memory returns to its baseline)."""
    from app.engine import Engine
    from app.server_session import ClientSession

    def alive(cls) -> int:
        gc.collect()
        # type(o), not isinstance: isinstance follows a dead weakref.proxy and raises.
        return sum(issubclass(type(o), cls) for o in gc.get_objects())

    with ServerThread(agent, ServerOptions(port=0)) as s:
        async def main():
            await soak.churn(s.ws_url, 12)
            await soak.wait_idle(s.url, 60)
        asyncio.run(main())
        assert alive(ClientSession) == 0 and alive(Engine) == 0


def test_sessions_reuse_vad_models(agent, monkeypatch):
    """Each session used to load its own silero model (a TorchScript load: ~0.4 s of CPU,
    and memory never fully returned); closed sessions now hand theirs on."""
    import speech.vad as vad
    loads, load = [], vad._load_silero
    monkeypatch.setattr(vad, "_load_silero", lambda: loads.append(1) or load())
    with ServerThread(agent, ServerOptions(port=0)) as s:
        async def main():
            for _ in range(8):                              # one after another
                await soak.churn(s.ws_url, 1)
                await soak.wait_idle(s.url, 60)
                gc.collect()
        asyncio.run(main())
    assert len(loads) <= 1, f"{len(loads)} silero loads for 8 sessions in turn"
