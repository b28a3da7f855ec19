"""`python run.py record OUT`: record a session from the local camera and microphone.

Capture only by default; `--agent` also runs the engine (replies on the speaker) and records
its events. Stops on Ctrl-C, SIGTERM or after --seconds; the session directory is written
append-only, so even a killed recorder leaves a replayable directory.
Cheap imports only at module level (run.py imports this to build its parser).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time

STATUS_EVERY = 0.25        # s between status line updates


def add_arguments(p) -> None:
    p.add_argument("out", metavar="OUT", help="new session directory to record into")
    p.add_argument("--camera", default="0", metavar="SOURCE",
                   help="camera index, video file (looped, played at its own pace) or stream "
                        "URL; 'none' records sound only (default: %(default)s)")
    p.add_argument("--input-device", default=None, metavar="NAME_OR_INDEX",
                   help="microphone (PortAudio name or index; default: the system's), or an "
                        "audio file played as the microphone in real time")
    p.add_argument("--output-device", default=None, metavar="NAME_OR_INDEX",
                   help="speaker for the agent's replies (with --agent)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--overwrite", action="store_true", help="replace an existing session in OUT")
    p.add_argument("--agent", action="store_true",
                   help="also run the agent: replies on the speaker, its events recorded")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="fusion checkpoint for --agent (default: the shipped model)")
    p.add_argument("--random", action="store_true", help="--agent with an untrained demo agent")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (with --agent)")
    p.add_argument("--mode", choices=("vanilla", "mctp"), default="mctp",
                   help="with --agent: audio generation, one token per backbone step (vanilla) "
                        "or MCTP (default: %(default)s)")
    p.add_argument("--half-duplex", action="store_true",
                   help="mute the microphone while the agent speaks (no echo cancellation)")


def _meter(level_dbfs: float, width: int = 20) -> str:
    n = int(round(width * min(1.0, max(0.0, (level_dbfs + 60) / 60))))
    return "#" * n + " " * (width - n)


class _Status:
    """A one-line live status on a terminal; a plain line per second otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.last = -math.inf
        self.every = STATUS_EVERY if self.tty else 1.0

    def show(self, seconds: float, frames: int, dbfs: float, extra: str = "") -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        line = (f"recording {seconds:7.1f} s  frames {frames:5d}  mic [{_meter(dbfs)}] "
                f"{dbfs:6.1f} dBFS{extra}")
        sys.stderr.write(("\r" + line + "  ") if self.tty else line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        sys.stderr.write(("\r\033[K" if self.tty else "") + text + "\n")
        sys.stderr.flush()
        self.last = -math.inf


def _open_mic(spec, output_device, output_rate: int, need_speaker: bool):
    """-> (source, sink or None, description)."""
    from speech.constants import SAMPLE_RATE
    from speech.io import DuplexDevice, FileSource, MemorySink
    if spec is not None and os.path.isfile(spec):
        sink = MemorySink(output_rate, clock=time.monotonic) if need_speaker else None
        return FileSource(spec, SAMPLE_RATE, realtime=True), sink, f"file {spec}"
    dev = DuplexDevice(spec, output_device, input_rate=SAMPLE_RATE, output_rate=output_rate)
    dev.start()
    return dev.source, dev.sink, f"device {dev.input_device}"


def run(args) -> None:
    import numpy as np

    from speech.constants import SAMPLE_RATE
    from speech.io import AudioDeviceError
    from vision.camera import Camera, CameraError

    from .frames import AudioIn, AudioOut, Interrupt, TurnDone, VideoIn
    from .recorder import Recorder
    from .session import SessionWriter

    if args.seconds is not None and not args.seconds > 0:
        sys.exit(f"error: --seconds must be > 0, got {args.seconds}")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        sys.exit(f"error: {args.out} is not empty; choose a new session directory or pass "
                 f"--overwrite")
    agent = None
    if args.agent or args.random or args.model:
        from .agent import load_agent, random_agent
        try:
            agent = random_agent("demo", device=args.device) if args.random else \
                load_agent(args.model, device=args.device)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
    camera = None
    if str(args.camera).lower() != "none":
        try:
            src = args.camera
            camera = Camera(src, realtime=True, loop=os.path.isfile(src)).start()
        except CameraError as e:
            sys.exit(f"error: {e} Or record sound only with --camera none.")
    try:
        source, sink, mic_name = _open_mic(args.input_device, args.output_device,
                                           agent.output_rate if agent else SAMPLE_RATE,
                                           agent is not None)
    except (AudioDeviceError, FileNotFoundError, ValueError) as e:
        if camera is not None:
            camera.stop()
        sys.exit(f"error: no microphone: {e}\nOr play an audio file as the microphone with "
                 f"--input-device FILE.")

    meta = {"source": "record", "camera": str(args.camera) if camera else None,
            "mic": mic_name, "agent": agent.name if agent else None}
    try:
        recorder = Recorder(SessionWriter(args.out, meta=meta, overwrite=args.overwrite))
    except (FileExistsError, OSError) as e:
        source.close()
        if camera is not None:
            camera.stop()
        sys.exit(f"error: {e}")
    status = _Status()
    engine = None
    if agent is not None:
        from .engine import Engine, EngineOptions, with_generation

        def on_output(f):
            if isinstance(f, AudioOut):
                sink.write(f.pcm)
            elif isinstance(f, Interrupt):
                sink.clear()
            elif isinstance(f, TurnDone):
                m = f.metrics
                lat = "-" if m.response_latency is None else f"{m.response_latency:.2f} s"
                status.message(f"turn {m.turn}: {m.text!r} (response latency {lat})")
        opts = with_generation(EngineOptions(half_duplex=args.half_duplex), mode=args.mode)
        engine = Engine(agent, on_output, opts, recorder=recorder)
        push = engine.push
    else:
        def push(frame):
            for _ in recorder.process(frame):
                pass

    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt           # a second Ctrl-C: stop finalising politely
        stop.set()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status.message(f"recording to {args.out} (camera: {meta['camera'] or 'none'}, mic: "
                   f"{mic_name}{', agent ' + agent.name if agent else ''}); Ctrl-C stops")
    samples, last_index, level, why = 0, -1, -120.0, "stopped"
    try:
        while not stop.is_set():
            chunk = source.read(timeout=0.1)
            if chunk is None:
                why = "the microphone input ended"
                break
            now = samples / SAMPLE_RATE
            if camera is not None and samples:   # frames only once the clock (mic) runs
                f = camera.latest()
                if f is not None and f.index > last_index:
                    push(VideoIn(now, np.asarray(f.image)))
                    last_index = f.index
                if camera.ended and camera.error is not None:
                    status.message(f"warning: camera stopped ({camera.error}); recording sound only")
                    camera = None
            if chunk.size:
                push(AudioIn(now, np.asarray(chunk, np.float32)))
                samples += len(chunk)
                rms = float(np.sqrt(np.mean(np.square(chunk, dtype=np.float64))))
                level = max(20 * math.log10(max(rms, 1e-6)), level - 3.0)  # fast up, slow down
            status.show(samples / SAMPLE_RATE, recorder.frames, level)
            if args.seconds is not None and samples >= args.seconds * SAMPLE_RATE:
                why = f"{args.seconds:g} s recorded"
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if engine is not None:
            engine.close()                    # stops a reply, closes the recorder
        recorder.close()
        source.close()
        if camera is not None:
            camera.stop()
    status.message(f"{why}: {recorder.seconds:.1f} s of audio and {recorder.frames} frames "
                   f"in {args.out}\nreplay it with: python run.py replay {args.out}")
