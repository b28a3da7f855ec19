"""One browser connection of app/server.py: its Engine, worker thread, queues and recording.

    receive loop (event loop) --input queue--> worker thread: resample/JPEG decode, record,
                                                engine.push_*  --outputs--> (reply thread)
    send loop (event loop) <--output queue (call_soon_threadsafe)--------------'

Latency on the browser path: every audio message is time-stamped on arrival, mapping the
session clock (input samples / rate) to wall time; a turn's `browser_response_latency` is
the wall time its first reply audio message was sent minus the wall time of the end of the
user's speech (the arrival of the message holding that sample, less the audio after it).
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from websockets.exceptions import ConnectionClosed

from speech.audio import pcm16_to_float
from speech.constants import SAMPLE_RATE
from speech.resample import StreamResampler

from . import protocol as P
from .engine import Engine
from .host import trim_memory
from .frames import (AudioOut, Control, Interrupt, SpeechEnd, SpeechStart, TextOut, TurnDone,
                     TurnEnd)

log = logging.getLogger("tandem.server")

_STOP = object()


class ClientSession:
    def __init__(self, server, ws, hello: P.ClientHello, sid: str):
        self.server, self.ws, self.hello, self.id = server, ws, hello, sid
        self.options = server.options
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue = asyncio.Queue(self.options.input_queue)
        self.queued_bytes = self.peak_queued_bytes = 0   # payload bytes waiting in the inbox
        self._drained = asyncio.Event()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"session-{sid}")
        self.engine: Engine | None = None
        self.recorder = None                     # app.recorder.Recorder with --record-dir
        self.pcm: StreamResampler | None = None   # input_rate -> 16 kHz, built in _open
        self.samples_in = 0                      # input samples received (at input_rate)
        self._arrivals: deque = deque(maxlen=4096)  # (session s at message end, wall s)
        self._first_sent: dict[int, float] = {}  # turn -> wall s its first audio was sent
        self.errors = 0
        self.closed = False
        self.scene = None                        # app.server_scene.SceneFeed: a demo-scene session
        self.words = None                        # app.live_words.UserWords: the user's words
        self.samples16 = 0                       # microphone samples pushed (16 kHz)

    # --- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        await self.loop.run_in_executor(self.pool, self._open)
        agent = self.server.agent
        await self.ws.send(P.encode(P.Kind.HANDSHAKE, P.server_handshake(
            self.id, self.hello.input_rate, agent.output_rate, agent.name)))
        log.info("session %s opened from %s (input %d Hz)", self.id, self.ws.remote_address,
                 self.hello.input_rate)
        worker, sender = asyncio.create_task(self._work()), asyncio.create_task(self._send())
        try:
            await self._receive()
        finally:
            await self.inbox.put(_STOP)
            await worker                         # processes what was received, then stops
            await self.close()                   # engine (reply cancelled) and recording
            await self.outbox.put(_STOP)
            try:
                await asyncio.wait_for(sender, 5.0)
            except TimeoutError:
                pass

    def _open(self) -> None:
        """On the worker thread: nothing a session builds may hold up the event loop."""
        o = self.options
        self.pcm = StreamResampler(self.hello.input_rate, SAMPLE_RATE)
        if o.record_dir:
            from .recorder import Recorder
            from .session import SessionWriter
            writer = SessionWriter(
                Path(o.record_dir) / self.id,
                meta={"source": "browser", "session": self.id, "model": self.server.agent.name,
                      "input_rate": self.hello.input_rate,
                      "user_agent": self.ws.request.headers.get("User-Agent", "")})
            self.recorder = Recorder(writer)
        if o.user_words:
            from .live_words import UserWords
            self.words = UserWords(self._on_words)
        try:
            self.engine = Engine(self.server.agent, self._on_output, o.engine, recorder=self.recorder)
            if self.hello.demo_scene is not None:
                from .server_scene import SceneFeed
                self.scene = SceneFeed(self.engine, self.hello.demo_scene, self._on_output)
        except BaseException:
            if self.recorder is not None:
                self.recorder.close()
            raise

    async def shutdown(self, reason: str) -> None:
        """Server shutdown: tell the client and close the connection; run() then processes
        what was received, closes the engine and finishes the recording."""
        try:
            await self.ws.send(P.event("shutdown", message=reason))
            await self.ws.close(1001, "shutdown")
        except ConnectionClosed:
            pass

    async def close(self) -> None:
        """Stop the engine and finish the recording (idempotent)."""
        if self.closed:
            return
        self.closed = True
        await self.loop.run_in_executor(self.pool, self._close_sync)
        self.pool.shutdown(wait=False)
        self.engine = self.recorder = self.pcm = None   # the connection may outlive us
        await asyncio.to_thread(trim_memory)
        log.info("session %s closed", self.id)

    def _close_sync(self) -> None:
        if self.words is not None:
            self.words.close()
        if self.engine is not None:
            tail = self.pcm.flush()
            if len(tail):                        # the resampler's last block
                self.engine.push_audio(tail)
            self.engine.close()                  # also finishes the recording
        elif self.recorder is not None:
            self.recorder.close()

    # --- input -----------------------------------------------------------------------------
    async def _receive(self) -> None:
        limits = self.options.limits
        async for message in self.ws:
            wall = time.perf_counter()
            try:
                kind, payload = P.decode(message, "client", limits)
                if kind == P.Kind.HANDSHAKE:
                    raise P.ProtocolError(P.BAD_HANDSHAKE, "handshake already done for this session")
                if kind == P.Kind.EVENT:
                    payload = self._control(payload)
                elif kind == P.Kind.AUDIO_IN:
                    self.samples_in += len(payload) // 2
                    self._arrivals.append((self.samples_in / self.hello.input_rate, wall))
            except P.ProtocolError as e:
                if not await self._error(e.code, e.message):
                    return
                continue
            while self.queued_bytes > self.options.input_queue_bytes:   # backpressure
                self._drained.clear()
                await self._drained.wait()
            size = len(payload) if isinstance(payload, bytes) else 0
            self.queued_bytes += size
            self.peak_queued_bytes = max(self.peak_queued_bytes, self.queued_bytes)
            await self.inbox.put((kind, payload))

    def _control(self, obj: dict) -> str:
        if obj.get("type") != "control":
            raise P.ProtocolError(P.BAD_EVENT, f"unknown event type {obj.get('type')!r}: clients "
                                               'send {"type": "control", "action": ...}')
        action = obj.get("action")
        if action not in P.CONTROL_ACTIONS + P.SCENE_ACTIONS:
            raise P.ProtocolError(P.BAD_EVENT, f"control action must be one of "
                                               f"{P.CONTROL_ACTIONS + P.SCENE_ACTIONS}, got {action!r}")
        if action in P.SCENE_ACTIONS and self.hello.demo_scene is None:
            raise P.ProtocolError(P.BAD_EVENT, f"{action} needs a demo-scene session (the "
                                               'handshake\'s "demo_scene")')
        return action

    async def _error(self, code: str, message: str) -> bool:
        """Report a protocol error to the client; False once it has made too many."""
        self.errors += 1
        if self.errors <= 5:                     # a misbehaving client must not flood the log
            log.info("session %s: %s: %s%s", self.id, code, message,
                     " (further errors are not logged)" if self.errors == 5 else "")
        if self.errors > self.options.max_errors:
            await self.ws.send(P.error(P.TOO_MANY_ERRORS, f"more than {self.options.max_errors} "
                                                          "protocol errors; closing"))
            await self.ws.close(1008, P.TOO_MANY_ERRORS)
            return False
        await self.ws.send(P.error(code, message))
        return True

    async def _work(self) -> None:
        while (item := await self.inbox.get()) is not _STOP:
            kind, payload = item
            self.queued_bytes -= len(payload) if isinstance(payload, bytes) else 0
            self._drained.set()
            try:
                try:
                    await self.loop.run_in_executor(self.pool, self._process, kind, payload)
                except P.ProtocolError as e:
                    await self._error(e.code, e.message)
                except Exception:
                    log.exception("session %s: processing a %s message failed", self.id, kind.name)
                    await self._error(P.INTERNAL, f"the server failed to process a "
                                                  f"{kind.name.lower()} message; see the server log")
            except ConnectionClosed:             # the client left: keep draining, quietly
                pass

    def _process(self, kind: P.Kind, payload) -> None:
        """On the session's worker thread."""
        eng = self.scene or self.engine          # a demo scene stands in front of the engine
        if kind == P.Kind.AUDIO_IN:
            pcm = self.pcm.feed(pcm16_to_float(payload))
            if len(pcm):
                if self.words is not None:       # the user's own voice, before any scene sound
                    self.words.keep(self.samples16, pcm)
                self.samples16 += len(pcm)
                eng.push_audio(pcm)
        elif kind == P.Kind.VIDEO_IN:
            import cv2
            image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                raise P.ProtocolError(P.BAD_VIDEO, f"video payload of {len(payload)} bytes could "
                                                   "not be decoded as a JPEG")
            eng.push_frame(image)
        else:                                    # a control action
            eng.push(Control(eng.now, payload))

    # --- output ----------------------------------------------------------------------------
    def _on_output(self, frame) -> None:
        """From the worker or the reply thread (the engine has recorded it): hand it over
        to the event loop."""
        if self.words is not None:
            if isinstance(frame, TurnEnd):
                self.words.heard(frame.turn, frame.speech_start, frame.speech_end)
            elif isinstance(frame, TurnDone):    # off the reply's path: after it is made
                self.words.transcribe(frame.metrics.turn)
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, frame)
        except RuntimeError:                     # the loop is gone (server stopped)
            pass

    def _on_words(self, turn: int, text: str) -> None:
        """From the transcription thread: what the user said in `turn`."""
        self._on_output(P.event("transcript", turn=turn, text=text))

    async def _send(self) -> None:
        from speech.audio import float_to_pcm16
        while (frame := await self.outbox.get()) is not _STOP:
            try:
                if isinstance(frame, bytes):         # a ready message (demo scene)
                    await self.ws.send(frame)
                    continue
                if isinstance(frame, AudioOut):
                    assert frame.sample_rate == self.server.agent.output_rate, frame.sample_rate
                    await self.ws.send(P.encode(P.Kind.AUDIO_OUT, float_to_pcm16(frame.pcm)))
                    self._first_sent.setdefault(frame.turn, time.perf_counter())
                    continue
                ev = _event(frame)
                if isinstance(frame, TurnDone):
                    m = frame.metrics
                    await self.ws.send(P.event("turn_end", t=ev["t"], turn=m.turn, text=m.text,
                                               interrupted=m.interrupted))
                    ev["browser_response_latency"] = self._browser_latency(m)
                    _log_turn(self.id, ev)
                await self.ws.send(P.encode(P.Kind.EVENT, ev))
            except ConnectionClosed:             # closed mid-reply: drain, send nothing
                pass
            except Exception:
                log.exception("session %s: sending %s failed", self.id, type(frame).__name__)

    def _wall_of(self, t: float) -> float | None:
        """Wall time at which session time `t` (input audio) reached the server."""
        arr = self._arrivals
        if not arr:
            return None
        i = bisect.bisect_left(arr, t, key=lambda a: a[0])
        end_t, wall = arr[min(i, len(arr) - 1)]
        return wall - (end_t - t)

    def _browser_latency(self, m) -> float | None:
        sent, heard = self._first_sent.pop(m.turn, None), self._wall_of(m.speech_end)
        return None if sent is None or heard is None else sent - heard


def _event(frame) -> dict:
    """An output frame as a protocol event (kind 4) dict."""
    t = round(float(frame.t), 4)
    if isinstance(frame, TextOut):
        return {"type": "reply_text", "t": t, "turn": frame.turn, "token": frame.token,
                "text": frame.text}
    if isinstance(frame, SpeechStart):
        return {"type": "speech_start", "t": t}
    if isinstance(frame, SpeechEnd):
        return {"type": "speech_end", "t": t}
    if isinstance(frame, TurnEnd):
        return {"type": "turn_start", "t": t, "turn": frame.turn,
                "speech_start": frame.speech_start, "speech_end": frame.speech_end}
    if isinstance(frame, Interrupt):
        return {"type": "interrupt", "t": t, "turn": frame.turn, "reason": frame.reason}
    if isinstance(frame, TurnDone):
        return {"type": "metrics", "t": t, **frame.metrics.to_dict()}
    assert False, type(frame)


def _log_turn(sid: str, ev: dict) -> None:
    def f(x):
        return "-" if x is None else f"{x * 1000:.0f} ms"
    log.info("session %s turn %d: response %s (browser path %s), compute %s, %.2f s of audio%s",
             sid, ev["turn"], f(ev["response_latency"]), f(ev["browser_response_latency"]),
             f(ev["compute_latency"]), ev["reply_seconds"], " (interrupted)" if ev["interrupted"] else "")
