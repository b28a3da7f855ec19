"""Evaluation (`run.py eval`), the model card and `run.py train all` on a tiny demo world:
a few real sessions, a tiny codec, a tiny model trained for a few steps, the real recogniser."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lab.ablations import encoder_fingerprint
from lab.eval import (EvalOptions, accuracy_table, answers_match, code_agreement,
                      dtw_mel_distance, evaluate, match_turns, heldout_triple_turns,
                      normalize_answer, recognise)
from speech.recognizer import is_recognized

STEPS = dict(encoder_steps=2, align_steps=2, sft_steps=2, batch=2, aux_batch=2,
             stages=("encoders", "align", "sft"))   # MCTP modules untrained: still MCTP decoding


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data (1 test session of 2 turns), a tiny codec and a tiny model trained a few steps,
    laid out as the pipeline ships them: assets/fusion.safetensors beside assets/codec/."""
    from lab.data import main
    from lab.train_fusion import FusionTrainOptions, train_fusion
    from speech.codec import build_codec, save_codec
    d = tmp_path_factory.mktemp("eval")
    main(d / "data", n_train_sessions=2, n_val_sessions=0, n_test_sessions=1, turns_per_session=2,
         n_codec_sentences=4, n_codec_eval=1, workers=1, progress=False)
    torch.manual_seed(0)
    save_codec(build_codec("tiny"), d / "assets" / "codec")
    train_fusion(FusionTrainOptions(data=str(d / "data"), codec=str(d / "assets" / "codec"),
                                    run_dir=str(d / "run"), out=str(d / "assets" / "fusion.safetensors"),
                                    preset="tiny", progress=False, threads=1, **STEPS))
    return d


@pytest.fixture(scope="module")
def recognizer():
    from lab.eval import load_recognizer
    return load_recognizer()


def test_ablations_trained_in_parallel_equal_serial_ones(world, tmp_path):
    from fusion.checkpoint import load_model
    from lab.ablations import run_ablations
    base = dict(data=str(world / "data"), model=str(world / "assets" / "fusion.safetensors"), device="cpu",
                max_text_tokens=4, ablations=True, ablation_names=("mean", "vision"), ablation_steps=2,
                train_run=str(world / "run"), threads=1, progress=False)
    par = run_ablations(EvalOptions(**base, ablation_root=str(tmp_path / "par"), ablation_workers=2))
    ser = run_ablations(EvalOptions(**base, ablation_root=str(tmp_path / "ser"), ablation_workers=1))
    for name in ("full", "mean", "vision"):
        a = load_model(tmp_path / "par" / f"ablation-{name}" / "model.safetensors").state_dict()
        b = load_model(tmp_path / "ser" / f"ablation-{name}" / "model.safetensors").state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert par["models"][name]["n"] == ser["models"][name]["n"] > 0
    assert load_model(tmp_path / "par" / "ablation-vision" / "model.safetensors").config.modalities == ("vision",)


def test_ablations_train_without_the_referent_losses_or_init(world, tmp_path):
    import shutil
    from lab.ablations import prepare_ablation_run
    from lab.train_fusion import FusionTrainOptions
    main = tmp_path / "main"
    main.mkdir()
    shutil.copyfile(world / "run" / "after_encoders.safetensors", main / "after_encoders.safetensors")
    opts = json.loads((world / "run" / "options.json").read_text())
    (main / "options.json").write_text(json.dumps({**opts, "referent_loss": 0.5, "encoder_parts": ["audio"],
                                                   "init": str(tmp_path / "gone.safetensors"),
                                                   "vision_cache": str(tmp_path / "gone.pt")}))
    for name in ("full", "mean"):     # "mean" has no cell clues for them: train_fusion would refuse
        kw = prepare_ablation_run(main, tmp_path / f"ablation-{name}", name, steps=2)
        assert kw["referent_loss"] == 0.0 and kw["ablation"] == name and kw["align_steps"] == 2
        assert kw["init"] is None and kw["vision_cache"] is None  # the main run's encoders and cache
        FusionTrainOptions(**kw)      # valid options, as the ablation trainer builds them


def test_ablations_of_an_init_run_share_only_its_encoders(world, tmp_path):
    """An --init run's after_encoders.safetensors holds the init's trained backbone beside the
    encoders: the ablations (and the control) take the encoders only, or they compare warm
    starts instead of architectures. A run without --init shares every common weight."""
    import shutil
    from fusion.checkpoint import load_model, save_model
    from lab.ablations import prepare_ablation_run
    from fusion.model import is_encoder_key
    opts = json.loads((world / "run" / "options.json").read_text())
    trained = load_model(world / "run" / "after_encoders.safetensors")
    with torch.no_grad():                       # stands in for the init's trained weights
        for k, v in trained.named_parameters():
            if not is_encoder_key(k):
                v.add_(1.0)
    theirs = trained.state_dict()
    for init in (None, str(world / "assets" / "fusion.safetensors")):
        main = tmp_path / f"main-{init is not None}"
        main.mkdir()
        save_model(trained, main / "after_encoders.safetensors")
        shutil.copyfile(world / "run" / "after_align.safetensors", main / "after_align.safetensors")
        (main / "options.json").write_text(json.dumps({**opts, "init": init}))
        for name in ("full", "mean"):
            run = tmp_path / f"abl-{init is not None}-{name}"
            prepare_ablation_run(main, run, name, steps=opts["align_steps"])
            mine = load_model(run / "after_encoders.safetensors").state_dict()
            enc = [k for k in mine if is_encoder_key(k)]
            rest = [k for k in mine if not is_encoder_key(k) and k in theirs
                    and theirs[k].shape == mine[k].shape and theirs[k].is_floating_point()]
            assert enc and rest and all(torch.equal(mine[k], theirs[k]) for k in enc), name
            copied = [torch.equal(mine[k], theirs[k]) for k in rest]
            assert all(copied) if init is None else not any(copied), (name, init, sum(copied), len(rest))
            # the main run's own align is the control only when it started where the control does
            assert (run / "model.safetensors").is_file() == (name == "full" and init is None), (name, init)


def test_ablations_of_a_model_whose_run_is_gone(world, tmp_path):
    """--ablation-data: the ablations start from the evaluated model's encoders (everything
    else a fresh init), with the data's training turns encoded by them once, as the trainer's
    cache stage encodes them; a second call trains and encodes nothing again."""
    from fusion.checkpoint import load_model, save_model
    from lab.data import TrainShards
    from lab.ablations import run_ablations
    from fusion.model import is_encoder_key
    trained = load_model(world / "assets" / "fusion.safetensors").float()
    with torch.no_grad():                    # away from any init, so a copied weight shows
        for k, v in trained.named_parameters():
            if not is_encoder_key(k):
                v.add_(1.0)
    model = save_model(trained, tmp_path / "shipped" / "fusion.safetensors")
    o = EvalOptions(data=str(world / "data"), model=str(model), codec=str(world / "assets" / "codec"),
                    device="cpu", max_text_tokens=4,
                    ablations=True, ablation_names=("mean",), ablation_steps=2,
                    train_run=str(tmp_path / "no-such-run"), ablation_data=str(world / "data"),
                    ablation_root=str(tmp_path), progress=False)
    r = run_ablations(o)
    assert set(r["models"]) == {"main", "full", "mean"} and r["encoders_only"] and r["models"]["mean"]["n"] == 2
    src = tmp_path / "ablation-source"
    cache = torch.load(src / "cache.pt", weights_only=False)
    trainer = torch.load(world / "run" / "cache.pt", weights_only=False)   # same encoders, fp32 there
    assert len(cache) == len(TrainShards(world / "data")) == len(trainer)
    for a, b in zip(cache, trainer):
        assert a.answer == b.answer and a.feats.frames.shape == b.feats.frames.shape
        assert torch.allclose(a.feats.frames.float(), b.feats.frames.float(), atol=2e-2, rtol=1e-2)
    main = load_model(model).float().state_dict()
    for name in ("full", "mean"):
        start = load_model(tmp_path / f"ablation-{name}" / "after_encoders.safetensors").state_dict()
        enc = [k for k in start if is_encoder_key(k)]
        rest = [k for k in start if not is_encoder_key(k) and k in main and main[k].shape == start[k].shape
                and main[k].is_floating_point()]
        assert enc and rest and all(torch.equal(start[k], main[k]) for k in enc), name
        assert not any(torch.equal(start[k], main[k]) for k in rest), name
    stamps = {f: f.stat().st_mtime_ns for f in (src / "cache.pt", tmp_path / "ablation-mean" / "model.safetensors")}
    again = run_ablations(o)
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps
    assert again["models"]["mean"]["overall"] == r["models"]["mean"]["overall"]
    with pytest.raises(FileNotFoundError, match="run.py data --out"):
        evaluate(EvalOptions(data=str(world / "data"), model=str(model), ablations=True,
                             codec=str(world / "assets" / "codec"), ablation_data=str(tmp_path / "empty"), out=str(tmp_path / "eval"), progress=False))


def test_evaluate_end_to_end_writes_every_section(world, tmp_path):
    from fusion.checkpoint import load_model, read_header
    from lab.model_card import write_model_card
    out = tmp_path / "eval"
    rep = evaluate(EvalOptions(data=str(world / "data"), model=str(world / "assets" / "fusion.safetensors"),
                               out=str(out), device="cpu", max_text_tokens=4, max_audio_seconds=0.4,
                               turn_end="silence",   # the fixed rule: compute latency is never hidden
                               ablations=True, ablation_names=("mean",), ablation_steps=2,
                               train_run=str(world / "run"),
                               ablation_root=str(tmp_path), progress=False))
    r = json.loads((out / "eval.json").read_text())
    events = [json.loads(line) for line in (world / "data/test/00000/events.jsonl").read_text().splitlines()]
    qtypes = sorted({e["qtype"] for e in events if e["type"] == "question"})
    assert r["questions"] == 2 and r["sessions"] == 1 and "CPU" in r["hardware"]
    for mode in ("vanilla", "mctp"):
        m = r["modes"][mode]
        assert sorted(m["accuracy"]["by_type"]) == qtypes and m["missed"] == 0
        assert m["response_latency"]["median"] > 0 and m["compute_latency"]["p90"] > 0
        assert 0 < m["end_of_turn_wait"]["median"] < m["response_latency"]["median"]
        tt = m["turn_taking"]
        assert tt["turn_end"]["silence"] == m["engine_turns"] and tt["preemptive_starts"] == 0
        assert tt["hesitant_questions"] + tt["fluent_questions"] == 2 and tt["accuracy_fluent"] is not None
        assert m["spoken"]["n"] == 2 and m["spoken"]["mel_dtw"] > 0 and m["spoken"]["recognised"] is not None
        per_turn = [t["modes"][mode]["codes_vs_reference"] for t in r["turns"]]
        assert None not in per_turn and len(per_turn) == 2      # code_agreement: its own test
        assert m["spoken"]["codes_vs_reference"] == pytest.approx(sum(per_turn) / 2)
        heard = [is_recognized(t["modes"][mode]["text"], t["modes"][mode]["transcript"])
                 and bool(t["modes"][mode]["text"].strip()) for t in r["turns"]]
        assert [t["modes"][mode]["heard_as_reply"] for t in r["turns"]] == heard
        assert m["spoken"]["heard_as_reply"] == sum(heard) / 2
    c = r["mctp_vs_vanilla"]
    assert c["forwards_speedup"] > 1.5 and c["turns_compared"] == 2
    assert c["audio_token_agreement"] is not None      # its value: test_audio_token_agreement
    assert r["spoken_reference"]["n"] == 2 and r["spoken_reference"]["recognised"] is not None
    assert [t["expected"] for t in r["turns"]] == [e["answer"] for e in events if e["type"] == "question"]
    # each question knows whether its scene shows a colour-shape-slot triple training never shows
    held = heldout_triple_turns(json.loads((world / "data/test/00000/session.json").read_text()))
    assert [t["heldout_triple"] for t in r["turns"]] == [held[e["turn"]] for e in events if e["type"] == "question"]
    scenes = r["modes"]["vanilla"]["accuracy"]["by_scene"]
    assert scenes["held-out triple"]["n"] + scenes["seen triples only"]["n"] == 2
    # the ablation: trained from the main run's encoders, with its own config
    # (align only; the control is the main run's own align checkpoint: same steps, seed, init)
    assert set(r["ablations"]["models"]) == {"main", "full", "mean"}
    assert (tmp_path / "ablation-mean" / "after_align.safetensors").is_file()
    assert not (tmp_path / "ablation-mean" / "after_sft.safetensors").exists()
    assert (tmp_path / "ablation-full" / "model.safetensors").read_bytes() == \
        (world / "run" / "after_align.safetensors").read_bytes()
    abl = tmp_path / "ablation-mean" / "model.safetensors"
    assert read_header(abl)[0].aggregator == "mean"
    main = load_model(world / "assets" / "fusion.safetensors")
    assert encoder_fingerprint(load_model(abl)) == encoder_fingerprint(main)
    assert r["ablations"]["models"]["mean"]["n"] == 2
    md = (out / "eval.md").read_text()
    for section in ("## Answer accuracy", "## Vanilla vs MCTP", "## Spoken answers", "## Latency",
                    "no aggregator (mean)", "main (text only)", "full model, same budget",
                    "training split never shows", *qtypes):
        assert section in md, section
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert rep.accuracy("mctp") == r["modes"]["mctp"]["accuracy"]["overall"]
    card = write_model_card(out / "eval.json", world / "run", tmp_path / "no-report.json", tmp_path / "CARD.md")
    text = card.read_text()
    assert "## Data" in text and "## Training" in text and "## Limits" in text and "### Spoken answers" in text
    assert "spoken by the fixed agent voice `piper:en_US-joe-medium`" in text
    assert "compute latency = end-of-turn decision to the first reply audio ready" in text


def test_answer_normalisation_and_accuracy_on_a_hand_made_report():
    assert answers_match("The red circle.", "the red circle")
    assert answers_match("2.", "two.") and normalize_answer(" On the  LEFT!") == "on the left"
    assert not answers_match("a square.", "a circle.") and not answers_match("", "yes.")
    # with the question type: the slot rule, sentences and phrases alike (eval and replay report)
    assert answers_match("The square is green.", "green.", "what_color")
    assert answers_match("green.", "green.", "what_color")
    assert not answers_match("The green square is red.", "green.", "what_color")   # two colours
    assert answers_match("I heard no beeps.", "none.", "count_beeps")
    assert answers_match("There are 2 objects.", "two.", "count_objects")
    assert not answers_match("There are three objects.", "two.", "count_objects")
    assert answers_match("No, there isn't.", "no.", "is_there")
    assert not answers_match("Yes, there is.", "no.", "is_there")
    assert not answers_match("The square is green.", "green.")     # no type: the texts must equal
    recs = [dict(qtype="pitch", group="audio", correct=True), dict(qtype="pitch", group="audio", correct=False),
            dict(qtype="shape_at", group="visual", correct=True), dict(qtype="where_sound", group="audio-visual",
                                                                         correct=False)]
    t = accuracy_table(recs)
    assert t["overall"] == 0.5 and t["n"] == 4
    assert t["by_type"]["pitch"] == {"accuracy": 0.5, "n": 2} and t["by_group"]["visual"]["accuracy"] == 1.0
    assert t["by_group"]["audio-visual"] == {"accuracy": 0.0, "n": 1} and "by_scene" not in t
    for r, held in zip(recs, (True, True, False, None)):
        r["heldout_triple"] = held
    t = accuracy_table(recs)["by_scene"]
    assert t == {"held-out triple": {"accuracy": 0.5, "n": 2}, "seen triples only": {"accuracy": 1.0, "n": 1}}
    session = {"world": "demo", "spec": {"turns": [
        {"scene": {"objects": [{"color": "green", "shape": "triangle", "slot": "right"}]}},
        {"scene": {"objects": [{"color": "green", "shape": "triangle", "slot": "left"}]}}]}}
    assert heldout_triple_turns(session) == [True, False]
    assert heldout_triple_turns({"world": "recorded"}) is None


def test_questions_match_the_last_overlapping_turn():
    turns = [SimpleNamespace(turn=1, speech_start=1.0, speech_end=1.6),    # the question, cut by a pause
             SimpleNamespace(turn=2, speech_start=1.9, speech_end=2.5),
             SimpleNamespace(turn=3, speech_start=9.0, speech_end=9.5)]    # a cough, no question
    qs = [{"t": 1.0, "t_end": 2.5}, {"t": 5.0, "t_end": 6.0}]
    assert [None if m is None else m.turn for m in match_turns(turns, qs)] == [2, None]


def test_audio_token_agreement():
    a = np.arange(24).reshape(4, 6) % 5
    assert code_agreement(a, a.copy()) == 1.0
    b = a.copy()
    b[0, :3] += 1                                  # 3 of 24 codes differ
    assert code_agreement(a, b) == pytest.approx(21 / 24)
    assert code_agreement(a, np.concatenate([a, a], 1)) == 1.0          # over the shorter
    assert code_agreement(a, np.zeros((4, 0), int)) == 0.0
    assert code_agreement(np.zeros((4, 0), int), np.zeros((4, 0), int)) is None


def test_recogniser_hears_a_clean_espeak_yes(recognizer):
    from speech.tts import ESPEAK_AGENT_VOICE, Voice, synthesize
    yes, no = synthesize("yes.", ESPEAK_AGENT_VOICE), synthesize("no.", ESPEAK_AGENT_VOICE)
    text, ok = recognise(recognizer, yes, "yes.")
    assert ok, text
    assert not recognise(recognizer, no, "yes.")[1]
    assert recognise(recognizer, np.zeros(0, np.float32), "yes.") == ("", False)
    v = ESPEAK_AGENT_VOICE
    slow = synthesize("yes.", Voice(v.name, v.variant, 110, v.pitch))
    assert dtw_mel_distance(yes, yes) == pytest.approx(0.0, abs=1e-6)
    assert dtw_mel_distance(yes, slow) < dtw_mel_distance(yes, no)


def test_options_are_validated():
    for bad in (dict(split="train"), dict(modes=("fast",)), dict(modes=()), dict(max_sessions=0),
                dict(model=None), dict(ablation_names=("text",)), dict(max_audio_seconds=0),
                dict(ablation_steps=0), dict(natural_data="")):
        with pytest.raises(ValueError):
            EvalOptions(**bad)


def test_command_lines_parse():
    import run
    a = run.build_parser().parse_args(["eval", "--modes", "mctp", "--no-recognizer", "--max-sessions", "2",
                                       "--ablations", "--ablation-names", "vision", "--ablation-steps", "7",
                                       "--ablation-data", "data/demo-large", "--no-dnsmos",
                                       "--natural-data", "data/natural"])
    from lab.eval_cli import options_from_args
    o = options_from_args(a)
    assert (o.modes, o.recognizer, o.max_sessions, o.ablations, o.ablation_names, o.ablation_steps,
            o.ablation_data) == (("mctp",), False, 2, True, ("vision",), 7, "data/demo-large")
    assert (o.dnsmos, o.natural_data) == (False, "data/natural")
    d = options_from_args(run.build_parser().parse_args(["eval"]))
    assert (d.ablation_names, d.ablation_steps, d.ablation_data) == (
        EvalOptions().ablation_names, EvalOptions().ablation_steps, None)
    assert (d.dnsmos, d.natural_data) == (True, None)
    t = run.build_parser().parse_args(["train", "all", "--budget", "small", "--no-ablations"])
    assert (t.what, t.budget, t.no_ablations, t.data) == ("all", "small", True, None)


def test_pipeline_data_step_and_example_sessions(world, tmp_path, monkeypatch):
    from app.session import load_session
    from lab import pipeline
    o = pipeline.PipelineOptions(budget="small", data=str(world / "data"))
    with pytest.raises(ValueError, match="--force"):       # rendered with other options
        pipeline.data_step(o)
    have = json.loads((world / "data" / "manifest.json").read_text())["options"]
    small = {**pipeline.BUDGETS["small"], "data": {k: v for k, v in have.items() if k not in ("seed", "workers")}}
    monkeypatch.setitem(pipeline.BUDGETS, "small", small)
    assert pipeline.data_step(pipeline.PipelineOptions(budget="small", data=str(world / "data"), workers=1)) is False
    old = tmp_path / "old"                      # rendered before agent_voice was an option: espeak-ng's
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"options": {k: v for k, v in have.items() if k != "agent_voice"}}))
    assert pipeline.data_step(pipeline.PipelineOptions(budget="small", data=str(old),
                                                       agent_voice="en-us+m3:165:50")) is False
    for voice in (None, "flite:rms"):                      # the default (Piper) or another voice asked for
        with pytest.raises(ValueError, match="--force"):
            pipeline.data_step(pipeline.PipelineOptions(budget="small", data=str(old), agent_voice=voice))
    with pytest.raises(ValueError, match="must be one of awb"):
        pipeline.PipelineOptions(agent_voice="flite:")
    assert pipeline.PipelineOptions(budget="small").path("model_out") == Path("runs/smoke/fusion.safetensors")
    (d,) = pipeline.write_example_sessions(tmp_path / "sessions", n=1, turns=1)
    # "large" (the shipped data and step counts) writes the shipped assets from its own data and run, and
    # its options are valid for every step
    from lab.data import DataOptions
    from lab.train_fusion import FusionTrainOptions
    big = pipeline.PipelineOptions(budget="large")
    assert big.path("model_out") != pipeline.PipelineOptions().path("model_out")
    assert big.path("data") != pipeline.PipelineOptions().path("data")
    b = pipeline.BUDGETS["large"]
    assert DataOptions(**b["data"]).n_train_sessions == 3 * DataOptions().n_train_sessions
    assert FusionTrainOptions(**b["fusion"]).align_steps > FusionTrainOptions().align_steps
    s = load_session(d)
    assert len([e for e in s.events if e["type"] == "question"]) == 1 and s.meta["split"] == "test"


def test_parallel_ablation_workers_never_oversubscribe_the_cores():
    from lab.ablations import worker_options
    from lab.train_fusion import FusionTrainOptions
    asked = [FusionTrainOptions(threads=t, progress=True) for t in (None, 2, 1)]
    got = worker_options(asked, workers=2, cpus=2)
    assert [o.threads for o in got] == [1, 1, 1]                  # --threads 2 x 2 workers: capped
    assert [o.progress for o in got] == [True, False, False]
    assert [o.threads for o in worker_options(asked, workers=2, cpus=8)] == [4, 2, 1]


def test_spoken_scores_compare_transcripts_with_the_replies_sentence(tmp_path):
    """recognised: the expected reply (a version-2 sentence) heard word for word; heard right:
    its slot; heard as the reply: the reply's own text."""
    import soundfile as sf

    from lab.eval import score_spoken
    wav = tmp_path / "r.wav"
    sf.write(wav, np.zeros(8000, np.float32), 16000)

    class Heard:                      # a recogniser that hears what the test says it hears
        def __init__(self, text):
            self.text = text

        def transcribe(self, audio):
            return self.text

    class Refs:
        dnsmos = None

        def __init__(self, text):
            self.recognizer = Heard(text)

        def get(self, reference):
            return {"audio16k": np.zeros(8000, np.float32), "codes": np.zeros((2, 4), int)}

    def record(text):
        return {"reference": "The square is green.", "expected": "green.", "qtype": "what_color",
                "text": text, "audio": str(wav), "codes": np.zeros((2, 4), int)}
    for heard, text, want in [("The square is green.", "The square is green.", (1, 1, 1)),
                              ("It's green.", "The square is green.", (0, 1, 0)),
                              ("The square is blue.", "The square is blue.", (0, 0, 1))]:
        r = record(text)
        score_spoken([r], Refs(heard))
        assert (r["recognised"], r["heard_slots"], r["heard_as_reply"]) == want, (heard, r)
    # the summary is the mean over the replies: codes all equal to the reference's, then none
    same, other = record("The square is green."), record("The square is green.")
    other["codes"] = np.ones((2, 4), int)
    summary = score_spoken([same, other], Refs("The square is green."))
    assert (same["codes_vs_reference"], other["codes_vs_reference"]) == (1.0, 0.0)
    assert summary["codes_vs_reference"] == 0.5 and summary["recognised"] == 1.0
