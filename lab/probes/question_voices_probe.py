"""How hard are the training question voices (`run.py data --question-voice mix`) to hear?

Whisper tiny.en (the eval's independent recogniser) transcribes the same 16 demo-world
questions spoken four ways; word error rate against the question text. Measured on the 2-core
box (2026-12-03, ~75 s):

    espeak-ng training voices, dry                          WER 0.234 (94 words)
    flite voices, rate and pitch changed (mix)              WER 0.053
    espeak-ng voices in a room (RT60 0.15-0.6 s, DRR 3-12)  WER 0.436
    espeak-ng voices in a room (RT60 0.15-0.5 s, DRR 6-15)  WER 0.340  <- demo/room.py's ranges
    Piper en_US-joe-medium (the natural-voice test)         WER 0.117

So flite's voices are closer to natural speech than espeak-ng's (the recogniser, trained on
real speech, hears them better), and the first room ranges blurred the questions more than a
user near a laptop microphone would; demo/room.py keeps the milder ones.

    python -m lab.probes.question_voices_probe [--n 16]
"""
import argparse

import numpy as np

from demo import room as R
from demo import voices as V
from demo import world as W
from speech import tts
from speech.constants import SAMPLE_RATE


def questions(n: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = set()
    for _ in range(400):
        scene = W.sample_scene(rng, 0.5)
        for qtype in W.QTYPE_IDS:
            cands = W.candidate_questions(scene, qtype)
            if cands:
                texts.add(cands[0].text)
    texts = sorted(texts)
    rng.shuffle(texts)
    return texts[:n]


def espeak(k: int, text: str) -> np.ndarray:
    return tts.synthesize(text, V.sample_voice(np.random.default_rng([9, k]), False, "espeak"))


def flite(k: int, text: str) -> np.ndarray:
    rng = np.random.default_rng([9, k])
    while not isinstance(voice := V.sample_voice(rng, False, "mix"), tts.FliteVoice):
        pass
    return tts.synthesize(text, voice)


def roomy(k: int, text: str) -> np.ndarray:
    y = R.reverberate(espeak(k, text), R.sample_room(np.random.default_rng([8, k])), SAMPLE_RATE)
    return (y / np.abs(y).max() * 0.5).astype(np.float32)


def piper(k: int, text: str) -> np.ndarray:
    return tts.synthesize(text, V.PIPER_QUESTION_VOICE)


def main(argv=None) -> None:
    from speech.recognizer import IndependentRecognizer, word_errors
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="questions (default: %(default)s)")
    args = p.parse_args(argv)
    rec = IndependentRecognizer(cpu_threads=1)
    qs = questions(args.n)
    for name, speak in (("espeak-ng training voices, dry", espeak),
                        ("flite voices, rate and pitch changed (mix)", flite),
                        (f"espeak-ng voices in a room (RT60 {R.RT60_S}, DRR {R.DRR_DB})", roomy),
                        ("Piper en_US-joe-medium (the natural-voice test)", piper)):
        errors = words = 0
        for k, q in enumerate(qs):
            e, n = word_errors(q, rec.transcribe(speak(k, q)))
            errors, words = errors + e, words + n
        print(f"{name}: WER {errors / words:.3f} ({words} words)", flush=True)


if __name__ == "__main__":
    main()
