"""Shared audio fixtures: a private PulseAudio server with a null sink (a virtual sound card
for PortAudio), and real speech synthesised with espeak-ng.

Import the fixtures into a test module: `from tests.fixtures_audio import pulse_null_sink`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from speech.audio import load_audio
from speech.constants import SAMPLE_RATE


@dataclass(frozen=True)
class PulseNullSink:
    server: str    # PULSE_SERVER address of the private daemon
    sink: str      # null sink: what is played into it is thrown away...
    monitor: str   # ...and comes back out of its monitor source
    device: str    # PortAudio (ALSA) device that reaches the daemon
    log: Path


def _pactl(server: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["pactl", "--server", server, *args], capture_output=True, text=True,
                          timeout=10)


@pytest.fixture(scope="session")
def pulse_null_sink(tmp_path_factory):
    """A private PulseAudio daemon (own runtime dir and socket, so it neither needs nor
    disturbs a desktop's or another test run's server), whose only sink is a null sink and
    default source that sink's monitor. PortAudio reaches it through ALSA's `pulse` device
    (libasound2-plugins, a dependency of Debian's pulseaudio); PULSE_SERVER points the
    plugin at it for the session. Works as root: the daemon runs in user mode (--system=false)
    and only warns about root; `-n` skips default.pa (no hardware probing in containers).
    A `pacat` playing silence keeps the null sink rendering in 20 ms blocks: without a
    low-latency client it renders ~2 s blocks and a new recorder gets nothing for ~1.6 s."""
    exe = shutil.which("pulseaudio")
    if exe is None or shutil.which("pactl") is None:
        pytest.fail("pulseaudio is not installed: run `make system-dev` "
                    "(apt-get install pulseaudio pulseaudio-utils)")
    d = tmp_path_factory.mktemp("pulse")
    sock, run_dir, log = d / "native", d / "run", d / "log"
    server = f"unix:{sock}"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(d), HOME=str(d), PULSE_RUNTIME_PATH=str(run_dir))
    env.pop("PULSE_SERVER", None)
    cmd = [exe, "--daemonize=no", "--system=false", "--exit-idle-time=-1", "-n",
           "--use-pid-file=no", f"--log-target=file:{log}",
           "-L", f"module-native-protocol-unix auth-anonymous=1 socket={sock}",
           "-L", "module-null-sink sink_name=tandem_null rate=48000"]
    # a child in the foreground (not --daemonize): terminated and reaped by this fixture
    with open(d / "stderr", "wb") as err:
        daemon = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    keeper, old = None, os.environ.get("PULSE_SERVER")
    try:
        deadline = time.monotonic() + 20
        while _pactl(server, "info").returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pulseaudio did not start (exit {daemon.poll()}): "
                            f"{(d / 'stderr').read_text()}\n"
                            f"{log.read_text() if log.exists() else ''}")
            time.sleep(0.1)
        for args in (("set-default-sink", "tandem_null"),
                     ("set-default-source", "tandem_null.monitor")):
            r = _pactl(server, *args)
            assert r.returncode == 0, (args, r.stderr)
        keeper = subprocess.Popen(
            ["pacat", "--playback", "--raw", "--latency-msec=20", "--rate=16000",
             "--channels=1", "--format=s16le", "-d", "tandem_null", "/dev/zero"],
            env=dict(env, PULSE_SERVER=server), stderr=subprocess.DEVNULL)
        os.environ["PULSE_SERVER"] = server
        if "sounddevice" in sys.modules:  # PortAudio listed devices before the server ran
            from speech.io import list_devices
            list_devices(refresh=True)
        yield PulseNullSink(server, "tandem_null", "tandem_null.monitor", "pulse", log)
    finally:
        if old is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = old
        for proc in (keeper, daemon):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def synth_speech(text: str, out_dir: Path, name: str) -> np.ndarray:
    """`text` spoken by espeak-ng, at 16 kHz, leading/trailing silence trimmed."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: run `make system` (apt-get install espeak-ng)")
    path = Path(out_dir) / f"{name}.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, timeout=60)
    x = load_audio(path, SAMPLE_RATE)
    loud = np.nonzero(np.abs(x) > 0.01)[0]
    assert loud.size, ("espeak-ng produced silence", path)
    return x[loud[0]:loud[-1] + 1]


@pytest.fixture(scope="session")
def speech_clips(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """Two short English utterances at 16 kHz (trimmed)."""
    d = tmp_path_factory.mktemp("espeak")
    return (synth_speech("What is the red object on the table?", d, "a"),
            synth_speech("Tell me more about the little dog.", d, "b"))
