"""`run.py bench`: every section runs on a tiny checkpoint and reports what it measured."""
import torch

from lab.bench import bench_training, format_report, run_bench
from fusion.checkpoint import save_model
from fusion.config import preset
from fusion.model import FusionModel
from speech.codec import build_codec, save_codec


def test_training_bench_times_every_stage_and_leaves_the_model_alone():
    torch.manual_seed(0)
    codec = build_codec("tiny")
    model = FusionModel(preset("tiny", codec.spec)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = bench_training(model, codec, torch.device("cpu"), batch=2, steps=3, amps=(False, True))
    assert [(row["stage"], row["amp"]) for row in r["rows"]] == [
        (s, a) for s in ("align", "sft", "mctp") for a in (False, True)]
    for row in r["rows"]:
        assert row["s_per_step"] > 0 and abs(row["examples_per_s"] * row["s_per_step"] - 2) < 1e-6, row
    assert r["recipe_minutes"] > 0
    assert r["recipe_steps"] == {"align": 2400, "sft": 600, "mctp": 250}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the benchmark trained the caller's model"


def test_bench_command_reports_all_sections(tmp_path):
    torch.manual_seed(0)
    codec = build_codec("tiny")
    save_codec(codec, tmp_path / "codec")  # found beside the checkpoint, as assets/ lays them out
    path = save_model(FusionModel(preset("tiny", codec.spec)), tmp_path / "m.safetensors")
    report = run_bench(str(path), device="cpu", json_path=str(tmp_path / "b.json"), quick=True)
    assert (tmp_path / "b.json").exists()
    assert report["generation"]["mctp_speedup_forwards"] > 1, report["generation"]
    assert [row["stage"] for row in report["training"]["rows"]][0] == "align"
    text = format_report(report)
    for needle in ("codec streaming decode", "vanilla vs MCTP",
                   "compute latency (end-of-turn decision -> first reply audio ready)",
                   "fusion training step"):
        assert needle in text, (needle, text)
    assert "first PCM" not in text
    lat = report["latency"]
    assert 0 < lat["compute_latency_ms_min"] <= lat["compute_latency_ms_median"]
    old = {**report, "latency": {"first_pcm_ms_median": 12.0, "first_pcm_ms_min": 10.0,
                                 "question_encode_and_aggregate_ms": 3.0}}   # an older bench JSON
    assert "median 12 ms (min 10 ms" in format_report(old)


def test_barge_in_latency_is_read_off_the_card_recording():
    """The live barge-in bench's analysis: agent (left) and user (right) on one clock."""
    import numpy as np
    from lab.bench_barge_in import _card_latencies, speech_onset
    sr = 48_000
    x = np.zeros((3 * sr, 2), np.float32)
    span = lambda a, b: slice(int(a * sr), int(b * sr))  # noqa: E731
    noise = np.random.default_rng(0).standard_normal(3 * sr).astype(np.float32) * 0.2
    x[span(0.05, 0.6), 1] = noise[span(0.05, 0.6)]        # the first question (not a barge-in)
    x[span(0.9, 1.37), 0] = 0.3                            # the agent's reply...
    x[span(1.2, 1.8), 1] = noise[span(1.2, 1.8)]           # ...talked over at 1.2 s
    x[span(2.2, 2.5), 1] = noise[span(2.2, 2.5)]           # talking while the agent is silent
    lat, extra = _card_latencies(x, sr)
    assert extra == {"utterances": 3, "not_playing": 1}, extra
    assert len(lat) == 1 and abs(lat[0] - 0.17) <= 0.005, lat
    clip = np.concatenate([np.zeros(800, np.float32), noise[:1600]])
    assert abs(speech_onset(clip, 16_000) - 800) <= 80
