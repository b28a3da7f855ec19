"""Clients that attack the browser server (app/server.py) over loopback: a fuzzing client,
connection churn, and a well-behaved conversation that measures its reply latency.
tests/test_fuzz.py runs them briefly against an in-process server; lab/soak.py (`python
run.py bench --soak`) runs the long form against `run.py serve` in a subprocess.

Every loop here is bounded in count and every wait has a deadline; traffic goes only to
127.0.0.1.
"""
from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app import protocol as P
from speech.audio import float_to_pcm16
from speech.constants import SAMPLE_RATE

QUESTION = "What is the red object on the table?"
MESSAGE_SECONDS = 0.02                  # audio per message, as the browser client sends


def jpeg(w: int = 160, h: int = 120, level: int = 90) -> bytes:
    import cv2
    img = np.full((h, w, 3), level, np.uint8)
    cv2.rectangle(img, (w // 4, h // 4), (w // 2, h // 2), (40, 40, 220), -1)
    return cv2.imencode(".jpg", img)[1].tobytes()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header claims width x height."""
    b = bytearray(jpeg(32, 24))
    i = 2
    while b[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(b[i + 2:i + 4], "big")
    b[i + 5:i + 7], b[i + 7:i + 9] = height.to_bytes(2, "big"), width.to_bytes(2, "big")
    return bytes(b)


def question_audio() -> np.ndarray:
    """A spoken question at 16 kHz (espeak-ng): 0.3 s silence, the question, 1.2 s silence."""
    from speech.tts import parse_voice, synthesize, trim_silence
    x = trim_silence(synthesize(QUESTION, parse_voice("en-us")), SAMPLE_RATE)
    z = lambda s: np.zeros(int(s * SAMPLE_RATE), np.float32)  # noqa: E731
    return np.concatenate([z(0.3), 0.8 * x / np.abs(x).max(), z(1.2)]).astype(np.float32)


def health(http_url: str) -> dict:
    with urllib.request.urlopen(http_url + "health", timeout=10) as r:
        return json.loads(r.read())


async def wait_idle(http_url: str, timeout: float = 60.0) -> None:
    """Until the server holds no session (deadline `timeout` s)."""
    async with asyncio.timeout(timeout):
        while (await asyncio.to_thread(health, http_url))["sessions"]:
            await asyncio.sleep(0.05)


async def close_quietly(ws) -> None:
    """Close from the client side, whatever state the server left the connection in (a
    server-side close racing ours can trip the client library; that is not the server's
    behaviour under test)."""
    try:
        await asyncio.wait_for(ws.close(), 10)
    except Exception:                           # noqa: BLE001  (client-side cleanup only)
        try:
            ws.transport.abort()
        except Exception:                       # noqa: BLE001  already torn down
            pass


async def open_session(ws_url: str, **handshake):
    """A connection past the handshake -> (ws, server handshake)."""
    ws = await connect(ws_url, max_size=None, open_timeout=10, close_timeout=2)
    await ws.send(P.encode(P.Kind.HANDSHAKE, {"protocol": 1, **handshake}))
    kind, payload = P.decode(await asyncio.wait_for(ws.recv(), 10), "server")
    if kind != P.Kind.HANDSHAKE:
        await close_quietly(ws)
        raise P.ProtocolError(payload.get("code", "?"), payload.get("message", ""))
    return ws, payload


# --- the well-behaved session ---------------------------------------------------------------
@dataclass
class Talk:
    turns_sent: int = 0
    latencies: list[float] = field(default_factory=list)   # s: speech end sent -> first audio
    metrics: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


async def talk(ws_url: str, question: np.ndarray, turns: int, deadline: float = 60.0) -> Talk:
    """One session asking `question` `turns` times in real time; every reply must arrive
    (its metrics event) within `deadline` s of the end of its question. Latency, measured by
    the client: wall time the first reply audio arrived minus wall time the message holding
    the end of the user's speech (the server's speech_end) was sent."""
    ws, hello = await open_session(ws_url)
    out, sent = Talk(), []                       # sent: (session s at message end, wall s)
    first_audio: dict[int, float] = {}
    turn_of_audio, done = [0], asyncio.Event()

    async def receive():
        async for m in ws:
            kind, p = P.decode(m, "server")
            if kind == P.Kind.AUDIO_OUT and turn_of_audio[0]:
                first_audio.setdefault(turn_of_audio[0], time.perf_counter())
            elif kind == P.Kind.ERROR:
                out.errors.append(p)
            elif p.get("type") == "turn_start":
                turn_of_audio[0] = p["turn"]
            elif p.get("type") == "metrics":
                out.metrics.append(p)
                done.set()

    reader = asyncio.create_task(receive())
    data, n = float_to_pcm16(question).tobytes(), int(2 * SAMPLE_RATE * MESSAGE_SECONDS)
    t_session, frame = 0.0, P.encode(P.Kind.VIDEO_IN, jpeg())
    try:
        for k in range(turns):
            done.clear()
            t0 = time.perf_counter() - t_session
            for i in range(0, len(data), n):
                if i % (n * 10) == 0:
                    await ws.send(frame)                    # 5 frames a second
                await ws.send(P.encode(P.Kind.AUDIO_IN, data[i:i + n]))
                t_session += len(data[i:i + n]) / 2 / SAMPLE_RATE
                sent.append((t_session, time.perf_counter()))
                await asyncio.sleep(max(0.0, t0 + t_session - time.perf_counter()))
            out.turns_sent += 1
            async with asyncio.timeout(deadline):
                while len(out.metrics) < k + 1:
                    await done.wait()
                    done.clear()
    finally:
        await close_quietly(ws)
        await asyncio.wait_for(reader, 10)
    for m in out.metrics:
        if m["turn"] in first_audio:
            i = next(j for j, (t, _) in enumerate(sent) if t >= m["speech_end"])
            heard = sent[i][1] - (sent[i][0] - m["speech_end"])
            out.latencies.append(first_audio[m["turn"]] - heard)
    return out


# --- the attacker -----------------------------------------------------------------------------
def _nested(depth: int) -> bytes:
    return b'{"type": "x", "a": ' + b"[" * depth + b"]" * depth + b"}"


def fuzz_messages(limits: dict, rng: random.Random) -> dict[str, bytes | str]:
    """One malformed message of each kind a session must answer with a protocol error."""
    good = jpeg()
    return {
        "garbage": bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
        "unknown_kind": bytes([rng.randrange(6, 256)]) + b"payload",
        "empty": b"", "text_frame": "hello",
        "wrong_direction": P.encode(P.Kind.AUDIO_OUT, bytes(64)),
        "odd_pcm": b"\x01" + bytes(641),
        "truncated_jpeg": P.encode(P.Kind.VIDEO_IN, good[:len(good) // 2]),
        "undecodable_jpeg": P.encode(P.Kind.VIDEO_IN, b"\xff\xd8\xff\xe0" + b"x" * 64 + b"\xff\xd9"),
        "huge_jpeg_header": P.encode(P.Kind.VIDEO_IN, jpeg_claiming(20000, 20000)),
        "truncated_json": b"\x04{\"type\": \"control\", \"act",
        "nested_event": b"\x04" + _nested(5000),
        "unknown_event": P.encode(P.Kind.EVENT, {"type": "dance"}),
        "bad_action": P.encode(P.Kind.EVENT, {"type": "control", "action": "explode"}),
        "second_handshake": P.encode(P.Kind.HANDSHAKE, {"protocol": 1}),
        "oversized_audio": b"\x01" + bytes(limits[P.Kind.AUDIO_IN] + 2),
        "oversized_event": b"\x04" + json.dumps({"type": "x", "p": "a" * limits[P.Kind.EVENT]}).encode(),
    }


BAD_HANDSHAKES = {
    "nested_handshake": b"\x00" + b"[" * 2000,
    "float_protocol": P.encode(P.Kind.HANDSHAKE, {"protocol": 1.0}),
    "rate_too_high": P.encode(P.Kind.HANDSHAKE, {"protocol": 1, "input_rate": 10**9}),
    "not_json": b"\x00{protocol",
    "media_first": P.encode(P.Kind.AUDIO_IN, bytes(640)),
}


@dataclass
class FuzzReport:
    cases: dict[str, int] = field(default_factory=dict)     # case -> times sent
    codes: dict[str, set] = field(default_factory=dict)     # case -> error codes answered
    unanswered: list[str] = field(default_factory=list)     # cases with no error in time
    internal: int = 0                                       # "internal" errors seen

    def add(self, case: str, code) -> None:
        self.cases[case] = self.cases.get(case, 0) + 1
        self.codes.setdefault(case, set()).add(code)
        self.internal += code == P.INTERNAL


async def _expect_error(ws, message, timeout: float = 10.0) -> str | None:
    """Send `message`; the next error's code (other messages are skipped), None if none."""
    await ws.send(message)
    try:
        async with asyncio.timeout(timeout):
            while True:
                kind, p = P.decode(await ws.recv(), "server")
                if kind == P.Kind.ERROR:
                    return p["code"]
    except (TimeoutError, ConnectionClosed):
        return None


def _raw_upgrade(port: int, host: str, origin: str | None, then: bytes = b"") -> bytes:
    """A raw websocket upgrade (optionally followed by bytes); returns the status line."""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.settimeout(5)
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n"
                      + (f"Origin: {origin}\r\n" if origin else "") + "\r\n").encode())
        status = sock.recv(4096).split(b"\r\n", 1)[0]
        if then:
            sock.sendall(then)
        return status


async def fuzz(ws_url: str, limits: dict, max_message_bytes: int, rounds: int = 1,
               seed: int = 0, question: np.ndarray | None = None) -> FuzzReport:
    """`rounds` passes over every attack: malformed messages in one session (each must get
    a protocol error, never "internal"), bad handshakes, odd rates, foreign origins, raw
    garbage, a message over the size limit, and (with `question`) a disconnect mid-reply."""
    rng, rep = random.Random(seed), FuzzReport()
    port = int(ws_url.rsplit(":", 1)[1].split("/")[0])
    for _ in range(rounds):
        ws, _ = await open_session(ws_url)
        try:
            for case, message in fuzz_messages(limits, rng).items():
                code = await _expect_error(ws, message)
                (rep.unanswered.append(case) if code is None else rep.add(case, code))
            code = await _expect_error(ws, b"\x02" + bytes(max_message_bytes + 10))
            (rep.unanswered.append("over_max_size") if code is None else rep.add("over_max_size", code))
        finally:
            await close_quietly(ws)
        for case, message in BAD_HANDSHAKES.items():
            async with connect(ws_url, open_timeout=10, close_timeout=2) as bad:
                code = await _expect_error(bad, message)
                (rep.unanswered.append(case) if code is None else rep.add(case, code))
        for rate in (8003, 11025, 47999):                   # odd rates: cheap, and they work
            ws, hello = await open_session(ws_url, input_rate=rate)
            await ws.send(P.encode(P.Kind.AUDIO_IN, bytes(2 * (rate // 10))))
            await close_quietly(ws)
            rep.add(f"rate_{rate}", hello["input_rate"])
        for origin in ("http://evil.example", "null"):
            status = await asyncio.to_thread(_raw_upgrade, port, f"127.0.0.1:{port}", origin)
            rep.add(f"origin_{origin}", status.decode(errors="replace").split(" ")[1])
        status = await asyncio.to_thread(
            _raw_upgrade, port, f"127.0.0.1:{port}", None, b"\x82\xfe\x10\x00\x01\x02" + bytes(50))
        rep.add("truncated_frame", status.decode(errors="replace").split(" ")[1])
        with socket.create_connection(("127.0.0.1", port), 5) as sock:   # not even HTTP
            sock.sendall(bytes(rng.randrange(256) for _ in range(300)) + b"\r\n\r\n")
        rep.add("raw_garbage", "sent")
        if question is not None:                            # gone mid-reply, no close
            ws, _ = await open_session(ws_url)
            data, n = float_to_pcm16(question).tobytes(), int(2 * SAMPLE_RATE * MESSAGE_SECONDS)
            for i in range(0, len(data), n):
                await ws.send(P.encode(P.Kind.AUDIO_IN, data[i:i + n]))
            try:
                async with asyncio.timeout(30):
                    while P.decode(await ws.recv(), "server")[0] != P.Kind.AUDIO_OUT:
                        pass
                rep.add("disconnect_mid_reply", "reply started")
            except TimeoutError:
                rep.unanswered.append("disconnect_mid_reply")
            ws.transport.abort()
    return rep


async def churn(ws_url: str, cycles: int, seed: int = 0, every: float = 0.0) -> int:
    """Open and close `cycles` sessions, each sending a little audio and a frame, one
    every `every` s (0: back to back); every fourth goes away without a close. Returns the
    sessions opened."""
    rng, opened, frame = random.Random(seed), 0, P.encode(P.Kind.VIDEO_IN, jpeg())
    for k in range(cycles):
        await asyncio.sleep(every)
        try:
            ws, _ = await open_session(ws_url)
        except (P.ProtocolError, InvalidStatus, OSError, TimeoutError):
            await asyncio.sleep(0.05)                      # busy: try the next one later
            continue
        opened += 1
        await ws.send(frame)
        await ws.send(P.encode(P.Kind.AUDIO_IN, bytes(2 * rng.randrange(160, 3200))))
        if k % 4 == 3:
            ws.transport.abort()
        else:
            await close_quietly(ws)
    return opened


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95)) if xs else float("nan")


def summary(xs: list[float]) -> str:
    if not xs:
        return "none"
    return (f"n={len(xs)} median {statistics.median(xs) * 1000:.0f} ms, "
            f"p95 {p95(xs) * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms")
