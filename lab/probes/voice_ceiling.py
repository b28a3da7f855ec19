"""How often the independent recogniser (Whisper tiny.en) hears each demo-world answer right when
spoken by a candidate agent voice: the ceiling of the eval's "recognised" score for that voice
(dev tool, not part of the app).

    python -m lab.probes.voice_ceiling en-us+m3:165 en-us+m1:150 flite:rms

Voices: what `run.py data --agent-voice` takes (`NAME[+VARIANT][:RATE_WPM[:PITCH]]` for
espeak-ng, `flite:NAME`), plus `flite:NAME:STRETCH` (flite's duration_stretch) and
`festival:VOICE` for Debian's festival (e.g. `festival:cmu_us_slt_arctic_hts`,
`festival:kal_diphone`; not a project dependency: apt-get install festival festvox-us-slt-hts).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile

import numpy as np

from demo import world as W
from speech.audio import resample
from speech.constants import SAMPLE_RATE
from speech.recognizer import IndependentRecognizer, is_recognized
from speech.tts import parse_voice, parse_wav_bytes, synthesize, trim_silence


def _external(args: list[str], stdin: bytes | None = None) -> np.ndarray:
    """A TTS command that writes a WAV file (`-o PATH` appended) -> 16 kHz, trimmed."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run([*args, "-o", f.name], input=stdin, check=True)
        x, sr = parse_wav_bytes(open(f.name, "rb").read())
    return trim_silence(resample(x, sr, SAMPLE_RATE), SAMPLE_RATE)


def speak(voice: str, text: str) -> np.ndarray:
    engine, _, rest = voice.partition(":")
    if engine == "festival":
        if shutil.which("text2wave") is None:
            raise SystemExit("festival not found: apt-get install festival festvox-us-slt-hts")
        return _external(["text2wave", "-eval", f"(voice_{rest})"], stdin=text.encode())
    if engine == "flite" and ":" in rest:          # flite:NAME:STRETCH, beyond the data's voices
        if shutil.which("flite") is None:
            raise SystemExit("flite not found: apt-get install flite")
        name, stretch = rest.split(":", 1)
        return _external(["flite", "-voice", name, "--setf", f"duration_stretch={stretch}", "-t", text])
    return synthesize(text, parse_voice(voice), SAMPLE_RATE)   # what `run.py data --agent-voice` takes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("voices", nargs="+", help="en-us+m3:165 | flite:rms ...")
    a = p.parse_args()
    rec = IndependentRecognizer(cpu_threads=2)
    texts = sorted(W.all_answer_texts())
    for voice in a.voices:
        missed = []
        for t in texts:
            heard = rec.transcribe(speak(voice, t))
            if not is_recognized(t, heard):
                missed.append(f"{t!r} -> {heard!r}")
        ok = len(texts) - len(missed)
        print(f"{voice}: {ok}/{len(texts)} heard right; missed: {'; '.join(missed) or 'none'}",
              flush=True)


if __name__ == "__main__":
    main()
