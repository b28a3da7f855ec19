"""Does the end-of-turn predictor hear the words, or only espeak's "?" intonation?

In the demo world a complete question is spoken with its "?" and a hesitation's first part
without it, so intonation alone could tell them apart. This probe swaps the cue on held-out
test voices (fresh one-turn sessions, test-split rules, no hesitations): (1) every cut-off
head spoken WITH a "?"; (2) every complete question spoken WITHOUT it. A model that keys on
the "?" calls the heads complete in (1) and misses the questions in (2). Asked 0.2 s into
the silence, threshold 0.5; ~30 s for 30 turns on one thread.

    python -m lab.probes.turn_end_prosody_probe runs/turn_end_1200 --turns 30
"""
import argparse

import numpy as np
import torch

from demo import world as W
from lab.turn_end_data import EXTRA_SILENCE, turn_examples
from speech.constants import SAMPLE_RATE, TURN_END_PAUSE
from speech.tts import synthesize_cached
from speech.turn_end import TurnEndPredictor


def with_q(text, voice, sr=SAMPLE_RATE):
    return synthesize_cached(text if text.endswith("?") else text + "?", voice, sr)


def without_q(text, voice, sr=SAMPLE_RATE):
    return synthesize_cached(text.rstrip("?"), voice, sr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="turn_end.safetensors or its folder")
    ap.add_argument("--turns", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(1)
    p = TurnEndPredictor.load(a.model)
    n = p.config.window_samples
    back = int(round((EXTRA_SILENCE[1] - TURN_END_PAUSE) * SAMPLE_RATE))
    length = n + int(round((EXTRA_SILENCE[1] - EXTRA_SILENCE[0]) * SAMPLE_RATE))
    for name, synth in (("heads spoken with '?'", with_q),
                        ("questions spoken without '?'", without_q)):
        probs, labels = [], []
        for i in range(a.turns):
            spec = W.sample_session(np.random.default_rng([0, 102, i]), 1,
                                    W.SplitRules("test"), synth=synth)
            for x, y, _ in turn_examples(spec, length, synth):
                probs.append(p.probability(x[len(x) - back - n:len(x) - back] / 32767.0))
                labels.append(y)
        probs, labels = np.array(probs), np.array(labels)
        print(f"{name}: recall of complete {(probs[labels == 1] >= 0.5).mean():.3f}, "
              f"false complete {(probs[labels == 0] >= 0.5).mean():.3f} "
              f"({int(labels.sum())} complete, {int((labels == 0).sum())} cut)")


if __name__ == "__main__":
    main()
