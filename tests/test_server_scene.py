"""The browser page's demo world on the server: GET /info (what the model knows, its questions,
the latency words) and demo-scene sessions (app/server_scene.py) with a random tiny agent and
real websocket clients. Every wait is bounded."""
from __future__ import annotations

import asyncio
import json

import cv2
import numpy as np
import pytest
from websockets.asyncio.client import connect

from app import protocol as P
from app.agent import random_agent
from app.demo_scene import DemoScene, DemoSceneOptions
from app.frames import LATENCY_WORDS
from app.server import ServerOptions, ServerThread
from app.session import load_session
from demo import world as W
from speech.constants import SAMPLE_RATE
from tests.test_server import http_get


@pytest.fixture(scope="module")
def agent():
    return random_agent("tiny")


def test_info_lists_the_world_questions_and_latency_words(agent):
    with ServerThread(agent, ServerOptions(port=0)) as s:
        code, ctype, body = http_get(s.url + "info")
    assert code == 200 and ctype == "application/json"
    info = json.loads(body)
    assert info["model"] == "random-tiny"
    text = " ".join(info["world"])
    assert all(w in text for w in (*W.COLORS, *W.SHAPES, *W.SLOTS, "beeps", "high or low"))
    listed = [q for g in info["questions"] for q in g["questions"]]
    assert len(listed) == len(W.QTYPES)                     # one per question type, in step
    assert "What color is the shape?" in listed and "Which object made the sound?" in listed
    assert "Where is the colour shape?" in listed
    assert {g["group"] for g in info["questions"]} == {"visual", "audio", "audio-visual"}
    assert {k: (v["name"], v["text"]) for k, v in info["latency"].items()} == LATENCY_WORDS


class SceneClient:
    def __init__(self, ws, hello):
        self.ws, self.hello = ws, hello
        self.events, self.errors, self.frames = [], [], []
        self.task = asyncio.create_task(self._loop())

    @classmethod
    async def open(cls, url, **handshake):
        ws = await connect(url, max_size=None, open_timeout=10)
        await ws.send(P.encode(P.Kind.HANDSHAKE, {"protocol": 1, **handshake}))
        kind, payload = P.decode(await asyncio.wait_for(ws.recv(), 10), "server")
        if kind == P.Kind.ERROR:
            raise P.ProtocolError(payload["code"], payload["message"])
        return cls(ws, payload)

    async def _loop(self):
        async for m in self.ws:
            kind, p = P.decode(m, "server")
            if kind == P.Kind.VIDEO_OUT:
                self.frames.append(p)
            elif kind == P.Kind.EVENT:
                self.events.append(p)
            elif kind == P.Kind.ERROR:
                self.errors.append(p)

    def of(self, type_):
        return [e for e in self.events if e["type"] == type_]

    async def until(self, pred, timeout=20.0):
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.02)

    async def silence(self, seconds: float):
        chunk = bytes(2 * SAMPLE_RATE // 50)                 # 20 ms of PCM16 silence
        for _ in range(int(seconds * 50)):
            await self.ws.send(P.encode(P.Kind.AUDIO_IN, chunk))
        await asyncio.sleep(0)


def _until_two_scenes(url: str, demo_scene: dict, script) -> SceneClient:
    """Open a demo-scene session, run `script(client)`, wait for the second scene, close."""
    async def main():
        c = await SceneClient.open(url, demo_scene=demo_scene)
        await script(c)
        await c.until(lambda: len(c.of("scene")) == 2)
        await c.ws.close()
        return c
    return asyncio.run(main())


def test_demo_scene_session_sends_frames_scene_and_beeps(agent, tmp_path):
    rec = tmp_path / "rec"
    ref = DemoScene(DemoSceneOptions(seed=5, scene_seconds=0))
    with ServerThread(agent, ServerOptions(port=0, record_dir=str(rec))) as s:
        async def script(c):
            await c.silence(4.0)
            await c.until(lambda: len(c.frames) >= 38 and c.of("scene"))
            await c.ws.send(P.event("control", action="new_scene"))
            await c.silence(0.5)
        c = _until_two_scenes(s.ws_url, {"seed": 5, "scene_seconds": 0}, script)
    first, second = c.of("scene")
    shown = ref.shown(0.0)
    assert first["index"] == 0 and first["description"] == shown.description
    assert first["examples"] == [q.text for q in shown.examples] and first["next_at"] is None
    assert second["index"] == 1 and second["description"] != first["description"]
    # 10 frames per second of session, each the scene as rendered (JPEG-close)
    assert 38 <= len(c.frames) <= 47
    img = cv2.imdecode(np.frombuffer(c.frames[20], np.uint8), cv2.IMREAD_COLOR)
    want = ref.frame(2.0).astype(int)
    assert img.shape == want.shape and np.abs(img.astype(int) - want).mean() < 4
    # the page is told of each beep of the first 4 s before it sounds
    beeps = [(b.t0, b.freq) for b in ref.beeps(0.0, 4.0)]
    told = [(e["t0"], e["freq"]) for e in c.of("scene_beep") if e["t0"] < 4.0]
    assert told == beeps and all(e["t"] <= e["t0"] for e in c.of("scene_beep"))
    # the agent saw the rendered frames and heard the beeps: the recording holds them
    (d,) = list(rec.iterdir())
    sess = load_session(d)
    assert len(sess.frames) >= 38
    beep = np.abs(sess.audio[int(beeps[0][0] * SAMPLE_RATE):][:800]).max() if beeps else 0.0
    assert not beeps or beep > 0.05
    assert np.abs(sess.audio[:int(0.9 * SAMPLE_RATE)]).max() == 0.0     # before: silence


def test_demo_scene_handshake_and_control_errors(agent):
    with ServerThread(agent, ServerOptions(port=0)) as s:
        async def main():
            for bad, words in (({"seed": -1}, "seed"), ({"scene_seconds": 1}, "scene_seconds"),
                               ({"fps": 3}, "only seed and scene_seconds"), ("yes", "true or an object")):
                with pytest.raises(P.ProtocolError) as e:
                    await SceneClient.open(s.ws_url, demo_scene=bad)
                assert e.value.code == P.BAD_HANDSHAKE and words in e.value.message, e.value
            c = await SceneClient.open(s.ws_url)              # a camera session
            await c.ws.send(P.event("control", action="new_scene"))
            await c.until(lambda: c.errors)
            assert c.errors[0]["code"] == P.BAD_EVENT and "demo-scene" in c.errors[0]["message"]
            await c.ws.close()
        asyncio.run(main())


def test_demo_scene_timer_shows_a_new_scene(agent):
    ref = DemoScene(DemoSceneOptions(seed=2, scene_seconds=5))
    with ServerThread(agent, ServerOptions(port=0)) as s:
        c = _until_two_scenes(s.ws_url, {"seed": 2, "scene_seconds": 5}, lambda c: c.silence(5.5))
    first, second = c.of("scene")
    assert (first["index"], first["next_at"]) == (0, 5.0)
    assert (second["index"], second["next_at"]) == (1, 10.0) and 5.0 <= second["t"] < 5.1
    assert second["description"] == ref.shown(5.0).description
