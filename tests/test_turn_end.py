"""The end-of-turn predictor (speech/turn_end.py) and its demo-world training
(lab/train_turn_end.py, lab/turn_end_data.py): tiny models only, a few steps."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from speech.constants import SAMPLE_RATE
from speech.turn_end import TurnEndConfig, TurnEndNet, TurnEndPredictor

SR = SAMPLE_RATE
TINY = TurnEndConfig(window_seconds=0.5, channels=8, n_conv=1, hidden=8)


def _tone(freq: float, seconds: float, rng) -> np.ndarray:
    n = int(seconds * SR)
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / SR)
            + 0.003 * rng.standard_normal(n)).astype(np.float32)


def _toy_examples(n: int = 16):
    """Complete = a high tone before the silence, incomplete = a low one."""
    from lab.turn_end_data import EXTRA_SILENCE, Examples
    rng = np.random.default_rng(0)
    L = TINY.window_samples + int(round((EXTRA_SILENCE[1] - EXTRA_SILENCE[0]) * SR))
    tail = int(EXTRA_SILENCE[1] * SR)
    audio, label = [], []
    for i in range(n):
        x = 0.003 * rng.standard_normal(L).astype(np.float32)
        x[L - tail - int(0.2 * SR):L - tail] = _tone(1200.0 if i % 2 else 300.0, 0.2, rng)
        audio.append(np.round(x * 32767).astype(np.int16))
        label.append(i % 2)
    z = np.zeros(n, np.int64)
    return Examples(np.stack(audio), np.array(label), np.where(np.array(label) == 1, 0, 2), z)


def test_a_tiny_model_learns_and_its_loss_falls(tmp_path):
    from lab.train_turn_end import fit, predict
    torch.manual_seed(0)
    net = TurnEndNet(TINY)
    ex = _toy_examples()
    hist = fit(net, ex, steps=60, batch=8, lr=1e-2, seed=0, run_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in hist]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses
    p = predict(TurnEndPredictor(net), ex)
    assert p[ex.label == 1].mean() > p[ex.label == 0].mean() + 0.2
    assert (tmp_path / "turn_end.state.pt").is_file()             # resumable checkpoint


def test_save_load_round_trip_gives_the_same_output(tmp_path):
    x = _tone(500.0, 0.8, np.random.default_rng(1))
    a = TurnEndPredictor.new(TINY, seed=1)
    b = TurnEndPredictor.load(a.save(tmp_path / "te.safetensors"))
    assert b.config == TINY and b.probability(x) == a.probability(x)
    assert TurnEndPredictor.load(tmp_path / "te.safetensors").probability(x) == a.probability(x)
    assert TurnEndPredictor.new(TINY, seed=2).probability(x) != a.probability(x)


def test_probability_is_a_deterministic_probability_of_the_last_window():
    rng = np.random.default_rng(2)
    p = TurnEndPredictor.new(TINY, seed=3)
    x = _tone(800.0, 0.6, rng)
    v = p.probability(x)
    assert 0.0 <= v <= 1.0 and p.probability(x.copy()) == v
    noise = 0.1 * rng.standard_normal(SR).astype(np.float32)
    assert p.probability(np.concatenate([noise, x])) == v          # only the last 0.5 s
    short = x[:SR // 10]
    assert p.probability(short) == p.probability(np.concatenate([np.zeros(SR, np.float32),
                                                                 short]))
    assert p.probability(torch.from_numpy(x)) == v


def test_bad_inputs_and_files_give_clear_errors(tmp_path):
    p = TurnEndPredictor.new(TINY)
    x = np.zeros(SR, np.float32)
    for bad, msg in ((np.zeros((2, SR), np.float32), "mono"),
                     (np.zeros(SR, np.int16), "pcm16_to_float"),
                     (np.full(SR, np.nan, np.float32), "NaN"),
                     (x[:100], "too little"), ([0.0] * SR, "numpy array")):
        with pytest.raises(ValueError, match=msg):
            p.probability(bad)
    with pytest.raises(ValueError, match="n_mels must be 80 or 128"):
        TurnEndConfig(n_mels=40)
    with pytest.raises(ValueError, match="hidden must be an integer"):
        TurnEndConfig(hidden=0)
    with pytest.raises(FileNotFoundError, match="lab.train_turn_end"):
        TurnEndPredictor.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a turn-end model"):
        TurnEndPredictor.load(tmp_path / "other.safetensors")
    from lab.train_turn_end import TurnEndTrainOptions
    with pytest.raises(ValueError, match="max_false_complete"):
        TurnEndTrainOptions(max_false_complete=1.0)


def test_threshold_and_scores():
    from lab.train_turn_end import scores, threshold_for
    from lab.turn_end_data import Examples
    probs = np.array([0.95, 0.9, 0.6, 0.3, 0.8, 0.5, 0.2, 0.1, 0.05, 0.01])
    label = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    kind = np.array([0, 0, 0, 0, 1, 2, 2, 2, 2, 2])
    ex = Examples(np.zeros((10, 4), np.int16), label, kind, np.arange(10))
    t = threshold_for(probs, label, 0.2)                         # 1 of 6 negatives may pass
    assert 0.5 < t <= 0.6 + 1e-6
    s = scores(probs, ex, t)
    assert (s["precision"], s["recall"]) == (0.75, 0.75)
    assert s["false_complete"] == round(1 / 6, 4) and s["false_complete_hesitation"] == 1.0
    assert threshold_for(probs, label, 0.0) > 0.8


def test_world_examples_end_in_silence_after_speech():
    from demo import world as W
    from lab.turn_end_data import EXTRA_SILENCE, KINDS, turn_examples
    spec = W.sample_session(np.random.default_rng(5), 1,
                            W.SplitRules("train", hesitation_prob=1.0))
    turns = tuple(replace(t, speech_noise_db=None) for t in spec.turns)    # no noise at all
    spec = W.SessionSpec(turns, spec.duration, None, spec.seed)
    n_words = len(spec.turns[0].question.text.split())
    exs = turn_examples(spec, SR)
    assert [k for _, _, k in exs].count("complete") == 1 and [y for _, y, _ in exs].count(1) == 1
    assert [k for _, _, k in exs].count("hesitation") == 1
    assert len(exs) == 1 + (n_words - 1) and {k for _, _, k in exs} <= set(KINDS)
    quiet = int((EXTRA_SILENCE[1] - 0.03) * SR)
    for x, _, kind in exs:
        x = x.astype(np.float64) / 32767
        before = x[-int(EXTRA_SILENCE[1] * SR) - int(0.3 * SR):-int(EXTRA_SILENCE[1] * SR)]
        assert np.sqrt(np.mean(before ** 2)) > 100 * np.sqrt(np.mean(x[-quiet:] ** 2) + 1e-20), \
            kind


def test_the_pause_probe_counts_a_hesitation_called_complete_as_a_cut_off():
    """lab/probes/turn_end_pauses.py scores with the trainer's `scores`: ends are the
    complete examples, hesitations the incomplete ones."""
    from lab.probes.turn_end_pauses import table
    lo, hi = table(np.array([0.9, 0.8, 0.2]), np.array([0.6, 0.1]), [0.5, 0.85])
    assert (lo["precision"], lo["recall"], lo["cut"], lo["cut_off"]) == (0.6667, 0.6667, 1, 0.5)
    assert (hi["precision"], hi["recall"], hi["cut"], hi["cut_off"]) == (1.0, 0.3333, 0, 0.0)
