"""The end-of-turn predictor at the pauses of rendered sessions (DEMO_WORLD.md version 2).

For each question of DATA/SPLIT: P(complete) asked `--lag + TURN_END_PAUSE` s after its end
(should be complete) and, when it hesitates, as long after the end of its first part (should
not be). Prints precision and recall of "complete" and the share of hesitations called
complete (a cut-off) per threshold, and the highest-recall threshold whose cut-off share on
this split is at most `--max-cut`. Choose on val, report on test. ~1 min per 300 questions.

    python -m lab.probes.turn_end_pauses data/hes --split val
"""
import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from lab.train_turn_end import scores
from lab.trainset import QUESTION_END_JITTER
from lab.turn_end_data import Examples
from speech.constants import SAMPLE_RATE, TURN_END_PAUSE
from speech.turn_end import TurnEndPredictor, window

VAD_END_LAG = float(np.mean(QUESTION_END_JITTER))   # s: the VAD's speech end after the true end, mean


def pause_probabilities(data: Path, split: str, predictor: TurnEndPredictor, lag: float):
    """(P at question ends, P at hesitations) over every session of the split."""
    ends, pauses = [], []
    for sdir in sorted(p for p in (data / split).iterdir() if (p / "events.jsonl").is_file()):
        mic, sr = sf.read(sdir / "mic.wav", dtype="float32")
        if sr != SAMPLE_RATE:
            raise ValueError(f"{sdir}/mic.wav is {sr} Hz; rendered sessions are {SAMPLE_RATE} Hz")
        events = [json.loads(line) for line in (sdir / "events.jsonl").read_text().splitlines()]

        def p_at(t: float) -> float:
            end = int(round((t + lag + TURN_END_PAUSE) * SAMPLE_RATE))
            return predictor.probability(window(mic[:end], predictor.config))

        for e in events:
            if e["type"] != "question" or "t_end" not in e:
                continue
            ends.append(p_at(e["t_end"]))
            if e.get("pause"):
                pauses.append(p_at(e["pause"][0]))
    return np.array(ends), np.array(pauses)


def table(ends: np.ndarray, pauses: np.ndarray, thresholds) -> list[dict]:
    """`lab.train_turn_end.scores` per threshold: question ends are the complete examples,
    hesitations the incomplete ones (a hesitation called complete is a cut-off)."""
    n, m = len(ends), len(pauses)
    ex = Examples(np.zeros((n + m, 0), np.int16), np.r_[np.ones(n), np.zeros(m)].astype(np.int64),
                  np.r_[np.zeros(n), np.ones(m)].astype(np.int64), np.zeros(n + m, np.int64))
    probs = np.concatenate([ends, pauses])
    return [{**scores(probs, ex, th), "cut_off": float((pauses >= th).mean()) if m else 0.0,
             "cut": int((pauses >= th).sum()), "hesitations": m} for th in thresholds]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="data from `run.py data --hesitations P`")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--model", default="assets/turn_end.safetensors")
    p.add_argument("--lag", type=float, default=VAD_END_LAG,
                   help="s the VAD's speech end trails the true end (default: %(default)s)")
    p.add_argument("--max-cut", type=float, default=0.015,
                   help="largest share of hesitations called complete (default: %(default)s)")
    a = p.parse_args(argv)
    predictor = TurnEndPredictor.load(a.model)
    ends, pauses = pause_probabilities(a.data, a.split, predictor, a.lag)
    rows = table(ends, pauses, np.round(np.arange(0.3, 0.96, 0.05), 2))
    print(f"{a.data}/{a.split}: {len(ends)} question ends, {len(pauses)} hesitations")
    print("threshold  precision  recall  cut-off")
    for r in rows:
        print(f"{r['threshold']:9.2f}  {r['precision']:9.3f}  {r['recall']:6.3f}  "
              f"{r['cut_off']:6.3f} ({r['cut']}/{r['hesitations']})")
    ok = [r for r in rows if r["cut_off"] <= a.max_cut]
    best = max(ok, key=lambda r: (r["recall"], -r["threshold"])) if ok else None
    print("chosen:", "none meets --max-cut" if best is None else
          f"{best['threshold']:.2f} (recall {best['recall']:.3f}, cut-off {best['cut_off']:.3f})")


if __name__ == "__main__":
    main()
