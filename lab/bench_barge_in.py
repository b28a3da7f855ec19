"""`python run.py bench --barge-in`: barge-in latency = the user's speech onset to the agent's
last sample out, p50 / p95, on two paths:

- engine: the session engine with the real VAD; a reply is playing (threaded engine, a long
  reply) when the barge-in speech arrives, pushed in 20 ms chunks paced at real time. The
  onset sample "arrives" at its place on that paced clock; the agent's last sample is the
  Interrupt (a player drops the rest there; the engine emits it after the reply thread has
  stopped). Also reported: how much of it is the VAD's own delay, in audio time (its 32 ms
  windows, `min_speech_ms` of speech before "start", the 20 ms chunks).
- live: `LocalDevices` on a virtual sound card: a private PulseAudio daemon with one stereo
  null sink ("card"); the speaker is a remap sink onto its left channel, the microphone a
  remap source of its right channel, and the user's speech is played into its right channel
  (so the agent never hears itself). One recording of the card's monitor holds both on the
  card's own clock: latency = last agent sample on the left - speech onset on the right. The
  agent's audio is replaced by a steady tone of the same length (same timing, same path) so
  that its last sample is unambiguous. Includes capture and playback buffering.

Needs espeak-ng (the speech), and for the live path pulseaudio + pulseaudio-utils.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from speech.constants import SAMPLE_RATE

from .virtual_card import wait_for

CHUNK = SAMPLE_RATE // 50            # 20 ms, like a microphone callback
QUESTIONS = ("What color is the circle?", "Where did the sound come from?",
             "Which object made the sound?", "What shape is on the left?")
BARGES = ("Wait, stop.", "No, tell me about the square.", "Hold on a second.", "Sorry, what?")


def speech_onset(x: np.ndarray, sr: int, rel: float = 0.05, frame_s: float = 0.005) -> int:
    """First sample of the first 5 ms frame whose RMS exceeds `rel` x the loudest frame's."""
    n = max(1, int(frame_s * sr))
    frames = x[:len(x) // n * n].reshape(-1, n)
    rms = np.sqrt((frames ** 2).mean(1))
    return int(np.argmax(rms > rel * rms.max())) * n


def _clips(trials: int):
    from speech.tts import Voice, synthesize_cached
    voices = [Voice("en-us", None, 160, 50), Voice("en-gb", None, 175, 40),
              Voice("en-us", "f3", 150, 60)]
    out = []
    for i in range(trials):
        v = voices[i % len(voices)]
        out.append((0.5 * synthesize_cached(QUESTIONS[i % len(QUESTIONS)], v),
                    0.5 * synthesize_cached(BARGES[i % len(BARGES)], v)))
    return out


def _summary(lat: list[float], **extra) -> dict:
    ms = np.asarray(lat) * 1000
    return {"trials": len(ms), "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
            "max_ms": float(ms.max()) if len(ms) else None, "latencies_ms": [round(v, 1) for v in ms],
            **extra}


def bench_engine(agent, trials: int = 20, seed: int = 0, reply_seconds: float = 3.0) -> dict:
    """The engine path (module doc)."""
    from app.engine import Engine, EngineOptions, with_generation
    from app.frames import AudioOut, Interrupt, SpeechStart
    opts = with_generation(EngineOptions(threaded=True), min_audio_seconds=reply_seconds,
                           max_audio_seconds=reply_seconds)
    rng = np.random.default_rng(seed)
    lat, vad, skipped, generating = [], [], 0, 0
    for question, barge in _clips(trials):
        seen: dict = {}

        def on_output(f):
            if isinstance(f, AudioOut):
                seen.setdefault("audio", time.perf_counter())
            elif isinstance(f, SpeechStart) and "audio" in seen:   # is the reply still running?
                th = eng.reply._thread
                seen.setdefault("generating", th is not None and th.is_alive())
            elif isinstance(f, Interrupt):
                seen.setdefault("interrupt", time.perf_counter())
        eng = Engine(agent, on_output, opts)
        try:
            lead = np.zeros(int(0.5 * SAMPLE_RATE), np.float32)
            for x in (lead, question, np.zeros(int(0.6 * SAMPLE_RATE), np.float32)):
                for i in range(0, len(x), CHUNK):
                    eng.push_audio(x[i:i + CHUNK])
            wait_for(lambda: "audio" in seen, 60, "reply audio", poll=0.005)
            gap = np.zeros(int(rng.uniform(0.1, 0.4) * SAMPLE_RATE), np.float32)
            mic = np.concatenate([gap, barge, np.zeros(SAMPLE_RATE // 2, np.float32)])
            onset = len(gap) + speech_onset(barge, SAMPLE_RATE)
            wall0 = time.perf_counter()
            detected = None
            for i in range(0, len(mic), CHUNK):
                wait = wall0 + (i + CHUNK) / SAMPLE_RATE - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)                   # the chunk's last sample has arrived
                eng.push_audio(mic[i:i + CHUNK])
                if "interrupt" in seen:
                    detected = i + CHUNK
                    break
            if detected is None:
                skipped += 1                           # the VAD missed it
                continue
            generating += bool(seen.get("generating"))
            lat.append(seen["interrupt"] - (wall0 + onset / SAMPLE_RATE))
            vad.append((detected - onset) / SAMPLE_RATE)
        finally:
            eng.close()
    vad_ms = np.asarray(vad) * 1000
    return _summary(lat, path="engine (real VAD, input paced at real time)", skipped=skipped,
                    still_generating=generating,
                    vad_p50_ms=float(np.percentile(vad_ms, 50)) if len(vad) else None,
                    vad_p95_ms=float(np.percentile(vad_ms, 95)) if len(vad) else None)


class _ToneSink:
    """Wraps a sink: each write becomes a 1 kHz tone of the same length (same timing)."""

    def __init__(self, sink):
        self.sink, self.sample_rate, self._n = sink, sink.sample_rate, 0

    def write(self, pcm) -> None:
        t = (self._n + np.arange(len(pcm))) / self.sample_rate
        self._n += len(pcm)
        self.sink.write((0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))

    def clear(self) -> None:
        self.sink.clear()

    def queued_seconds(self) -> float:
        return self.sink.queued_seconds()

    def close(self) -> None:
        self.sink.close()


def bench_live(agent, trials: int = 8, seed: int = 0, reply_seconds: float = 3.0) -> dict:
    """The live path (module doc)."""
    from app.engine import EngineOptions, with_generation
    from app.live import LiveOptions, LocalDevices
    from speech.io import list_devices
    from .virtual_card import VirtualCard
    card = VirtualCard()
    old = os.environ.get("PULSE_SERVER")
    os.environ["PULSE_SERVER"] = card.server
    rec_path = card.dir / "card.f32"
    rng = np.random.default_rng(seed)
    live = None
    try:
        list_devices(refresh=True)
        card.record(rec_path)                # the card keeps and ends the recorder
        opts = LiveOptions(camera=None, input_device="pulse", output_device="pulse",
                           engine=with_generation(EngineOptions(), min_audio_seconds=reply_seconds,
                                                  max_audio_seconds=reply_seconds))
        live = LocalDevices(agent, opts).start()
        live.sink = _ToneSink(live.sink)
        wait_for(lambda: live.snapshot().clock > 0.5, 30, "microphone audio", poll=0.005)
        clips = _clips(trials + 1)
        card.say(clips[0][0])                            # the first question
        for k in range(trials):
            n = len(live.snapshot().metrics)
            wait_for(lambda: live.snapshot().status == "speaking", 60, "reply audio", poll=0.005)
            time.sleep(rng.uniform(0.2, 0.6))            # into the reply
            card.say(clips[k + 1][1])                    # the user talks over it
            wait_for(lambda: len(live.snapshot().metrics) > n, 60, "the interrupted turn's metrics", poll=0.005)
        wait_for(lambda: live.snapshot().status == "speaking", 60, "the last reply", poll=0.005)
        time.sleep(0.5)
    finally:
        if live is not None:
            live.stop()
        if old is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = old
        try:
            x = np.fromfile(rec_path, np.float32) if rec_path.exists() else np.zeros(0, np.float32)
        finally:
            card.close()
        list_devices(refresh=True)
    lat, extra = _card_latencies(x[:len(x) // 2 * 2].reshape(-1, 2), card.RATE)
    return _summary(lat, path="live (LocalDevices on a PulseAudio virtual card)", **extra)


def _card_latencies(x: np.ndarray, sr: int, thr: float = 0.01):
    """(latencies, extra) from the card recording: each user utterance on the right after the
    first that starts while the agent's tone plays on the left -> the left's last loud sample
    before the utterance ends, minus its onset."""
    hop = sr // 200                                      # 5 ms frames
    n = len(x) // hop
    rms = np.sqrt((x[:n * hop].reshape(n, hop, 2) ** 2).mean(1))   # (n, 2)
    agent, user = rms[:, 0] > thr, rms[:, 1] > thr
    # user utterances: runs of speech frames joined over gaps < 300 ms
    starts, ends = [], []
    idx = np.nonzero(user)[0]
    for j, f in enumerate(idx):
        if j == 0 or f - idx[j - 1] > 60:
            starts.append(f)
            if j:
                ends.append(idx[j - 1])
    if len(idx):
        ends.append(idx[-1])
    lat, not_playing = [], 0
    for s, e in list(zip(starts, ends))[1:]:
        if not agent[max(0, s - 20):s].any():            # the agent was not speaking: no barge-in
            not_playing += 1
            continue
        talk = np.nonzero(agent[s:e + 1])[0]
        last = s + (talk[-1] + 1 if len(talk) else 0)    # end of the last loud frame
        lat.append((last - s) * hop / sr)
    return lat, {"utterances": len(starts), "not_playing": not_playing}


def run(agent=None, trials: int = 20, live_trials: int = 8, live: bool = True) -> dict:
    """Both paths on `agent` (default: the shipped model)."""
    from app.agent import load_agent
    from app.host import cpu_name
    import torch
    agent = agent if agent is not None else load_agent()
    report = {"hardware": f"{cpu_name()}, {os.cpu_count()} cores, torch threads "
                          f"{torch.get_num_threads()}", "model": agent.name,
              "engine": bench_engine(agent, trials)}
    if live:
        report["live"] = bench_live(agent, live_trials)
    return report


def format_report(r: dict) -> str:
    lines = [f"barge-in latency (speech onset -> agent's last sample out), {r['model']} on "
             f"{r['hardware']}"]
    for key in ("engine", "live"):
        s = r.get(key)
        if s is None or not s["trials"]:
            continue
        extra = (f"; the VAD's own delay p50 {s['vad_p50_ms']:.0f} / p95 {s['vad_p95_ms']:.0f} ms"
                 if s.get("vad_p50_ms") is not None else "")
        lines.append(f"  {s['path']}: p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, "
                     f"max {s['max_ms']:.0f} ms over {s['trials']} trials{extra}")
    return "\n".join(lines)


def run_cli(args) -> None:
    """`run.py bench --barge-in [--model PATH] [--device D] [--quick] [--json PATH]`."""
    import json
    from app.agent import load_agent, random_agent
    if args.model and Path(args.model).exists():
        agent = load_agent(args.model, device=args.device)
    else:
        print(f"(no trained model at {args.model}: the demo preset with random weights)")
        agent = random_agent("demo")
    rep = run(agent, trials=5 if args.quick else 20, live_trials=3 if args.quick else 10)
    print(format_report(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
        print(f"\nJSON written to {args.json}")
