"""How often the independent recogniser (Whisper tiny.en) hears each demo-world answer right when
spoken by a candidate agent voice: the ceiling of the eval's "recognised" score for that voice
(dev tool, not part of the app).

    PYTHONPATH=. python scripts/voice_ceiling.py en-us+m3:165 en-us+m1:150 flite:rms

Voices: `NAME[+VARIANT][:RATE_WPM]` for espeak-ng (rate and pitch default to the agent
voice's), `flite:VOICE[:STRETCH]` for Debian's flite (STRETCH: its duration_stretch), `festival:VOICE` for Debian's festival (e.g.
`festival:cmu_us_slt_arctic_hts`, `festival:kal_diphone`; neither is a project dependency:
apt-get install flite festival festvox-us-slt-hts).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile

import numpy as np

from fusion import world as W
from speech.audio import resample
from speech.constants import SAMPLE_RATE
from speech.recognizer import IndependentRecognizer, is_recognized
from speech.tts import AGENT_VOICE, Voice, parse_wav_bytes, synthesize, trim_silence


def speak(voice: str, text: str) -> np.ndarray:
    if voice.startswith("flite:"):
        if shutil.which("flite") is None:
            raise SystemExit("flite not found: apt-get install flite")
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            _, name, *stretch = voice.split(":")
            extra = ["--setf", f"duration_stretch={stretch[0]}"] if stretch else []
            subprocess.run(["flite", "-voice", name, *extra, "-t", text, "-o", f.name],
                           check=True)
            x, sr = parse_wav_bytes(open(f.name, "rb").read())
        return trim_silence(resample(x, sr, SAMPLE_RATE), SAMPLE_RATE)
    if voice.startswith("festival:"):
        if shutil.which("text2wave") is None:
            raise SystemExit("festival not found: apt-get install festival festvox-us-slt-hts")
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            subprocess.run(["text2wave", "-eval", f"(voice_{voice.split(':', 1)[1]})", "-o",
                            f.name], input=text.encode(), check=True)
            x, sr = parse_wav_bytes(open(f.name, "rb").read())
        return trim_silence(resample(x, sr, SAMPLE_RATE), SAMPLE_RATE)
    name, _, rate = voice.partition(":")
    name, _, variant = name.partition("+")
    voice = Voice(name, variant or None, int(rate or AGENT_VOICE.rate_wpm), AGENT_VOICE.pitch)
    return synthesize(text, voice, SAMPLE_RATE)


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
