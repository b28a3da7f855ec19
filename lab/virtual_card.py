"""A virtual sound card for measuring the live path: a private PulseAudio daemon (own socket
and runtime dir, so it neither needs nor disturbs a desktop's server) with one stereo null sink
"card". The speaker (default sink "spk") is a remap sink onto the card's left channel; the
microphone (default source "mic") a remap source of its right channel. `say()` plays speech
into the right channel, so the agent hears the user and never itself; `record()` captures the
card's monitor, both channels on the card's own clock. Needs pulseaudio + pulseaudio-utils.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from speech.constants import SAMPLE_RATE


def wait_for(cond, timeout: float, what: str, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(poll)


class VirtualCard:
    """The card of the module doc; `close()` stops the daemon and its clients."""

    RATE = 48_000

    def __init__(self):
        for exe in ("pulseaudio", "pactl", "paplay", "parecord"):
            if shutil.which(exe) is None:
                raise RuntimeError(f"{exe} not found: the live barge-in bench needs "
                                   "`apt-get install pulseaudio pulseaudio-utils` (make system)")
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-card-"))
        self.server = f"unix:{self.dir / 'native'}"
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(self.dir), HOME=str(self.dir),
                        PULSE_RUNTIME_PATH=str(self.dir / "run"), PULSE_SERVER=self.server)
        mods = [f"module-native-protocol-unix auth-anonymous=1 socket={self.dir / 'native'}",
                f"module-null-sink sink_name=card rate={self.RATE} channels=2",
                "module-remap-sink sink_name=spk master=card channels=1 channel_map=mono "
                "master_channel_map=front-left remix=no",
                "module-remap-source source_name=mic master=card.monitor channels=1 "
                "channel_map=mono master_channel_map=front-right remix=no"]
        cmd = ["pulseaudio", "--daemonize=no", "--system=false", "--exit-idle-time=-1", "-n",
               "--use-pid-file=no", f"--log-target=file:{self.dir / 'log'}"]
        for m in mods:
            cmd += ["-L", m]
        self.procs = [subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)]
        wait_for(lambda: self._pactl("info") == 0, 20, "PulseAudio daemon")
        for args in (("set-default-sink", "spk"), ("set-default-source", "mic")):
            assert self._pactl(*args) == 0, args
        # a low-latency client keeps the null sink rendering in small blocks
        self.procs.append(subprocess.Popen(
            ["pacat", "--playback", "--raw", "--latency-msec=20", "--rate=16000", "--channels=2",
             "--format=s16le", "-d", "card", "/dev/zero"], env=self.env, stderr=subprocess.DEVNULL))

    def _pactl(self, *args) -> int:
        return subprocess.run(["pactl", "--server", self.server, *args], capture_output=True,
                              timeout=10, env=self.env).returncode

    def record(self, path: Path) -> subprocess.Popen:
        p = subprocess.Popen(["parecord", "--device=card.monitor", "--raw", "--format=float32le",
                              f"--rate={self.RATE}", "--channels=2", "--latency-msec=10",
                              str(path)], env=self.env)
        self.procs.append(p)
        return p

    def say(self, pcm16k: np.ndarray) -> None:
        """Plays speech into the card's right channel (the microphone), waits until done."""
        import soundfile as sf
        path = self.dir / "say.wav"
        sf.write(str(path), np.stack([np.zeros_like(pcm16k), pcm16k], 1), SAMPLE_RATE,
                 subtype="FLOAT")
        subprocess.run(["paplay", "--device=card", "--latency-msec=10", str(path)],
                       env=self.env, check=True, timeout=60)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
