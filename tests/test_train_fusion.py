"""Fusion training: the staged pipeline on a tiny demo world, resume, DDP on two CPU
processes, and the pretrained preset (Whisper-format encoder, Hugging Face LM, EnCodec
24 kHz through its real loader) with tiny random weights."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion.checkpoint import load_model, read_header
from fusion.generator import GenerationOptions, Generator
from lab.train_fusion import FusionTrainOptions, train_fusion
from speech.codec import build_codec, load_codec, save_codec

ROOT = Path(__file__).resolve().parent.parent
STEPS = dict(encoder_steps=3, align_steps=3, sft_steps=3, mctp_steps=3, batch=3, aux_batch=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lab.data import main
    d = tmp_path_factory.mktemp("world")
    main(d / "data", n_train_sessions=3, n_val_sessions=0, n_test_sessions=0, turns_per_session=3,
         n_codec_sentences=4, n_codec_eval=1, workers=1, progress=False)
    torch.manual_seed(0)
    save_codec(build_codec("tiny"), d / "codec")
    return d


def opts(world, run, **kw):
    kw = {"codec": str(world / "codec"), **STEPS, **kw}
    return FusionTrainOptions(data=str(world / "data"), run_dir=str(run), out=None, preset="tiny",
                              progress=False, threads=1, **kw)


def test_staged_pipeline_trains_and_resumes(world, tmp_path):
    run = tmp_path / "run"
    final = train_fusion(opts(world, run))
    for stage in ("encoders", "align", "sft", "mctp"):
        hist = json.loads((run / f"{stage}.history.json").read_text())
        assert len(hist) == 3 and all(h["loss"] == h["loss"] for h in hist)  # ran, no NaN
        assert (run / f"{stage}.loss.png").stat().st_size > 1000
    assert "qwords" in json.loads((run / "encoders.history.json").read_text())[0]  # question heads by default
    codec = load_codec(world / "codec")
    model = load_model(final, codec=codec)
    from fusion.checkpoint import load_with_codec   # a run directory's model finds the codec it
    assert load_with_codec(final)[1].spec == codec.spec   # was trained against (its options)
    cfg, extra = read_header(final)
    assert set(extra["timings_s"]) >= {"encoders", "cache", "align", "sft", "mctp"}
    # align trains every fusion part (projectors, aggregator, LM) and no encoder
    a = load_model(run / "after_encoders.safetensors", codec=codec).state_dict()
    b = load_model(run / "after_align.safetensors", codec=codec).state_dict()
    changed = {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])}
    trainable = {n for n, _ in model.named_children()} - {"audio_encoder", "vision_encoder", "mctp"}
    assert changed == trainable and "sync_proj" in changed, (changed, trainable)
    # frozen parts stay frozen: the MCTP stage changed only the MCTP modules
    after_sft = load_model(run / "after_sft.safetensors", codec=codec)
    a, b = after_sft.state_dict(), load_model(run / "after_mctp.safetensors", codec=codec).state_dict()
    changed = {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])}
    assert changed == {"mctp"}, changed
    # the trained model generates
    from fusion.dummy import random_features
    ev = list(Generator(model, codec, GenerationOptions(max_text_tokens=3, max_audio_seconds=0.2)).run(
        model.prefix(random_features(model.config))))
    assert ev[-1].stats.backbone_forwards > 0
    # resume: everything done, so nothing is retrained
    before = json.loads((run / "timings.json").read_text())
    train_fusion(opts(world, run))
    assert json.loads((run / "timings.json").read_text())["sft"] == before["sft"]


def test_training_resumes_mid_stage(world, tmp_path):
    """Killed after the checkpoint at step 2 of 4, the stage carries on from that checkpoint
    (its history, weights and optimizer state) and ends where an unbroken run ends."""
    run = tmp_path / "run"
    train_fusion(opts(world, run, stages=("align",), align_steps=2))
    (run / "after_align.safetensors").unlink()  # as if killed after the checkpoint at step 2
    state = torch.load(run / "align.state.pt", weights_only=False)
    first = [{**h, "from": "checkpoint"} for h in state["history"]]   # marks what was resumed
    torch.save({**state, "history": first}, run / "align.state.pt")
    train_fusion(opts(world, run, stages=("align",), align_steps=4))
    hist = json.loads((run / "align.history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert hist[:2] == first and "from" not in hist[2], hist      # steps 1-2 were not redone
    whole = tmp_path / "whole"                                     # the same 4 steps unbroken
    train_fusion(opts(world, whole, stages=("align",), align_steps=4))
    ref = json.loads((whole / "align.history.json").read_text())
    for a, b in zip(hist, ref):      # same batches, same weights and optimizer moments
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (hist, ref)
    codec = load_codec(world / "codec")
    a = load_model(run / "after_align.safetensors", codec=codec).state_dict()
    b = load_model(whole / "after_align.safetensors", codec=codec).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_type_balanced_batches_weigh_every_type_the_same():
    import numpy as np
    from lab.train_fusion import batch_indices, type_groups
    qtypes = ["where"] * 90 + ["color"] * 9 + ["count"]      # skewed, as in the data
    groups = type_groups(qtypes)
    assert groups == [list(range(90, 99)), [99], list(range(90))]   # types sorted
    rng = np.random.default_rng(0)
    drawn = [qtypes[i] for _ in range(500) for i in batch_indices(100, 6, rng, groups)]
    shares = {t: drawn.count(t) / len(drawn) for t in set(qtypes)}
    assert all(abs(s - 1 / 3) < 0.05 for s in shares.values()), shares
    plain = [qtypes[i] for _ in range(500) for i in batch_indices(100, 6, rng)]
    assert plain.count("where") / len(plain) > 0.8             # uniform over turns: skewed


def test_align_trains_on_type_balanced_batches(world, tmp_path, monkeypatch):
    import lab.train_fusion as tf
    seen, real = [], tf.batch_indices
    monkeypatch.setattr(tf, "batch_indices", lambda *a, **kw: seen.append(a) or real(*a, **kw))
    run = tmp_path / "run"
    train_fusion(opts(world, run, stages=("align",), align_steps=2, sample="by_type"))
    hist = json.loads((run / "align.history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2] and all(h["text"] > 0 for h in hist)
    # every align batch was drawn type by type, over groups that cover all turns once
    assert len(seen) == 2 and all(a[3] is not None for a in seen), seen
    groups = seen[0][3]
    assert len(groups) > 1 and sorted(i for g in groups for i in g) == list(range(seen[0][0]))


def test_amp_trains_in_bf16_autocast(world, tmp_path):
    from lab.train_loop import use_amp
    assert use_amp(torch.device("cpu"), "on") and not use_amp(torch.device("cpu"), "off")
    with pytest.raises(ValueError, match="amp"):
        use_amp(torch.device("cpu"), "fast")
    with pytest.raises(ValueError, match="amp"):
        FusionTrainOptions(amp="yes")
    loss = {}
    for amp in ("off", "on"):
        run = tmp_path / amp
        train_fusion(opts(world, run, stages=("align",), align_steps=2, amp=amp))
        loss[amp] = [h["loss"] for h in json.loads((run / "align.history.json").read_text())]
    # same data and init: bf16 matmuls move the loss a little, and only a little
    assert loss["on"] != loss["off"], loss
    assert all(abs(a - b) < 0.05 * b for a, b in zip(loss["on"], loss["off"])), loss


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="stage"):
        FusionTrainOptions(stages=("warmup",))
    with pytest.raises(ValueError, match="hf-model"):
        FusionTrainOptions(preset="pretrained")
    with pytest.raises(ValueError, match="slot_heads"):
        FusionTrainOptions(slot_heads="pairs")


def test_factorised_slot_heads_learn_colour_and_shape_apart(world, tmp_path):
    from fusion.model import FusionModel
    from lab.pretrain import EncoderPretrainer
    from lab.trainset import OBJECT_CLASSES
    model = FusionModel(_tiny_config(world))
    joint, fact = EncoderPretrainer(model), EncoderPretrainer(model, "factorised")
    assert joint.head_sizes == [13] and fact.head_sizes == [5, 4]
    assert joint.slot_head.out_features == 14 and fact.slot_head.out_features == 10
    gt = OBJECT_CLASSES.index("green triangle")
    same_colour = OBJECT_CLASSES.index("green circle")
    assert fact._target0[gt] == fact._target0[same_colour] != fact._target0[0] == 0
    assert fact._target1[gt] != fact._target1[same_colour]
    assert joint._target0[gt] == gt
    # trained on every colour-shape pair but one (green triangle), over column features that
    # carry colour and shape apart, factorised heads name the unseen pair; a joint head cannot
    acc = {h: _slot_head_accuracy(_tiny_config(world), h, held_out=gt)
           for h in ("joint", "factorised")}
    assert acc["factorised"]["held_out"] == 1.0 and acc["joint"]["held_out"] < 0.5, acc
    assert acc["factorised"]["seen"] == acc["joint"]["seen"] == 1.0, acc
    # a slot counts as right only when colour and shape both are
    assert acc["factorised"]["colour_only"] == 0.0, acc
    # and the training stage runs with them
    train_fusion(opts(world, tmp_path / "run", stages=("encoders",), slot_heads="factorised"))
    hist = json.loads((tmp_path / "run" / "encoders.history.json").read_text())
    assert len(hist) == STEPS["encoder_steps"] and all(h["obj"] == h["obj"] for h in hist)


def _slot_head_accuracy(config, heads, held_out, steps=300):
    """Trains an EncoderPretrainer's slot head alone (its vision encoder an identity over
    column features: one-hot colour + one-hot shape + noise) on every class but `held_out`;
    returns acc_obj on the held-out class, on seen classes, and with the shape label wrong."""
    from demo import world as W
    from fusion.model import FusionModel
    from lab.pretrain import EncoderPretrainer
    from lab.trainset import OBJECT_CLASSES
    torch.manual_seed(0)
    pre = EncoderPretrainer(FusionModel(config), heads, parts=("vision",))
    pre.vision_encoder = torch.nn.Identity()
    rows, D = pre.rows, pre.slot_head.in_features
    nc = len(W.COLORS)

    def feats(cls):                                       # (B, 3) classes -> (B, rows*3, D)
        x = torch.zeros(*cls.shape, D)
        for i, name in enumerate(OBJECT_CLASSES[1:], 1):
            c, s = name.split()
            x[cls == i, list(W.COLORS).index(c)] = 1.0
            x[cls == i, nc + list(W.SHAPES).index(s)] = 1.0
        x = x + 0.05 * torch.randn_like(x)
        return x[:, None].expand(-1, rows, -1, -1).reshape(len(cls), rows * 3, D)

    def run(cls, labels=None):
        labels = cls if labels is None else labels
        return pre(feats(cls), labels, torch.zeros_like(labels), *[None] * 6)

    seen = torch.tensor([i for i in range(1, len(OBJECT_CLASSES)) if i != held_out])
    opt = torch.optim.Adam(pre.slot_head.parameters(), lr=0.05)
    for _ in range(steps):
        out = run(seen[torch.randint(len(seen), (32, 3))])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        wrong_shape = torch.tensor([[OBJECT_CLASSES.index("green circle")] * 3])
        return {"held_out": float(run(torch.full((1, 3), held_out))["acc_obj"]),
                "seen": float(run(seen[:9].view(3, 3))["acc_obj"]),
                "colour_only": float(run(torch.full((1, 3), held_out), wrong_shape)["acc_obj"])}


def _tiny_config(world):
    from fusion.config import preset
    return preset("tiny", load_codec(world / "codec").spec)


def test_loop_checkpoints_unless_told_not_to(tmp_path):
    from lab.train_loop import LoopOptions, train
    lin = torch.nn.Linear(3, 1)
    x = torch.randn(8, 3)
    loss = lambda m, step: {"loss": m(x).pow(2).mean()}  # noqa: E731
    train("kept", lin, list(lin.parameters()), loss, LoopOptions(3, ckpt_every=100), tmp_path, progress=False)
    train("none", lin, list(lin.parameters()), loss, LoopOptions(3, ckpt_every=0), tmp_path, progress=False)
    assert (tmp_path / "kept.state.pt").is_file()            # at the last step, too
    assert not (tmp_path / "none.state.pt").exists()
    assert (tmp_path / "none.history.json").is_file()        # curves are still written
    with pytest.raises(ValueError, match="ckpt_every"):
        LoopOptions(3, ckpt_every=-1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(world, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "run.py"),
           "train", "fusion", "--data", str(world / "data"), "--codec-dir", str(world / "codec"),
           "--run-dir", str(run), "--preset", "tiny", "--stages", "align,sft", "--align-steps", "3",
           "--sft-steps", "2", "--batch", "2", "--model-out", "", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0, r1 = (run / "weights.rank0.txt").read_text(), (run / "weights.rank1.txt").read_text()
    assert r0 == r1
    # and the ranks really trained: the 2 DDP steps of SFT moved the weights align left
    hist = json.loads((run / "sft.history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2]
    codec = load_codec(world / "codec")
    a = load_model(run / "after_align.safetensors", codec=codec).state_dict()
    b = load_model(run / "after_sft.safetensors", codec=codec).state_dict()
    moved = {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])}
    assert moved and not moved & {"audio_encoder", "vision_encoder", "mctp"}, moved


def test_pretrained_preset_with_tiny_random_weights(world, tmp_path, monkeypatch):
    """Real loading paths, tiny random weights in the real formats."""
    import whisper
    from encodec import EncodecModel
    # a Whisper checkpoint in whisper's own format
    dims = whisper.model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2,
                                         n_audio_layer=1, n_vocab=51864, n_text_ctx=8, n_text_state=64,
                                         n_text_head=2, n_text_layer=1)
    wpath = tmp_path / "tiny-whisper.pt"
    torch.save({"dims": vars(dims), "model_state_dict": whisper.model.Whisper(dims).state_dict()}, wpath)
    # EnCodec 24 kHz through its real loader, from the torch hub cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    m24 = EncodecModel.encodec_model_24khz(pretrained=False)
    for layer in m24.quantizer.vq.layers:
        layer._codebook.embed.normal_()
    torch.save(m24.state_dict(), cache / "encodec_24khz-d7cc33bc.th")
    hf = tmp_path / "hf.json"
    hf.write_text(json.dumps(dict(model_type="llama", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                  vocab_size=32, max_position_embeddings=2048)))
    run = tmp_path / "pre"
    o = FusionTrainOptions(data=str(world / "data"), codec="encodec_24khz", run_dir=str(run), out=None,
                           preset="pretrained", whisper=str(wpath), hf_config=str(hf), progress=False,
                           threads=1, stages=("align", "sft", "mctp"), align_steps=1, sft_steps=1,
                           mctp_steps=1, batch=2)
    final = train_fusion(o)
    cfg, _ = read_header(final)
    assert cfg.backbone == "hf" and cfg.codec.name == "encodec_24khz" and cfg.audio.n_state == 64
    from fusion.checkpoint import load_with_codec
    model, codec = load_with_codec(final)
    assert codec.sample_rate == 24000


def test_batches_by_type_weigh_every_question_type_alike():
    import numpy as np
    from lab.train_fusion import batch_indices, type_groups
    qtypes = ["what_color"] * 90 + ["where_is"] * 10
    groups = type_groups(qtypes)
    assert groups == [list(range(90)), list(range(90, 100))]
    rng = np.random.default_rng(0)
    uni = [qtypes[i] for _ in range(50) for i in batch_indices(100, 20, rng)]
    by = [qtypes[i] for _ in range(50) for i in batch_indices(100, 20, rng, groups)]
    assert 0.05 < uni.count("where_is") / len(uni) < 0.15
    assert 0.4 < by.count("where_is") / len(by) < 0.6
    b = batch_indices(100, 20, rng)
    assert len(set(b)) == 20 and all(0 <= i < 100 for i in b)   # no turn twice in a batch
    assert len(batch_indices(5, 20, rng)) == 5
    with pytest.raises(ValueError, match="sample"):
        FusionTrainOptions(sample="balanced")


def _turn(objects, question, sound_slot=None):
    from demo import world as W
    objs = tuple(W.WorldObject(s, c, p, W.COLORS[c], 60.0, 120.0) for c, s, p in objects)
    scene = W.Scene(W.Background("flat", (10, 10, 10), (10, 10, 10), 0, 0), objs, (), (), sound_slot)
    q = W.Question("x", question, "x.", "visual")
    return W.TurnSpec(scene, 0.0, q, None, 1.0, 2.0, 3.0, -20.0, None)


def test_referent_targets_point_at_the_named_slot_object_or_none():
    from lab.referents import referent_targets
    objs = [("red", "square", "left"), ("blue", "circle", "right")]
    t = lambda q, snd=None: referent_targets(_turn(objs, q, snd)).tolist()  # noqa: E731
    assert t("What shape is on the middle?") == [0, 1, 0, 0, 0, 0, 1]     # the named slot
    assert t("Where is the blue circle?", "left") == [0, 0, 1, 1, 0, 0, 1]  # the object; who beeped
    assert t("What color is the square?") == [1, 0, 0, 0, 0, 0, 1]       # the shape alone
    assert t("Is there a red circle?") == [0, 0, 0, 0, 0, 0, 1]           # named, absent: no slot
    assert t("How many objects are there?", "right") == [0, 0, 0, 0, 0, 1, 0]  # names nothing


def test_referent_loss_trains_the_cell_clues(world, tmp_path):
    """Align with `referent_loss` from a model with pooled cell clues: the probe's losses are
    logged and fall, and the model it trains is a plain checkpoint (the probe is not in it)."""
    from fusion.checkpoint import save_model
    from fusion.model import FusionModel
    with pytest.raises(ValueError, match="pooled cell clues"):        # tiny has none
        train_fusion(opts(world, tmp_path / "plain", stages=("align",), referent_loss=1.0))
    with pytest.raises(ValueError, match="referent_loss"):
        FusionTrainOptions(referent_loss=-1)
    torch.manual_seed(0)
    cfg = _tiny_config(world).replace(pooled_clues=True, cell_query=True, sound_cells=True)
    run = tmp_path / "ref"
    save_model(FusionModel(cfg), run / "after_encoders.safetensors")
    train_fusion(opts(world, run, stages=("align",), align_steps=30, batch=8, referent_loss=1.0, lr=3e-3))
    hist = json.loads((run / "align.history.json").read_text())
    ref = [h["referent"] for h in hist]
    assert all(h["sound"] > 0 for h in hist) and ref[0] > 0
    assert sum(ref[-5:]) < 0.8 * sum(ref[:5]), ref
    model = load_model(run / "after_align.safetensors", codec=load_codec(world / "codec"))
    assert model.config == cfg
    assert not any("probe" in k for k in model.state_dict())


def test_shift_augmentation_keeps_the_slot_and_its_labels(world):
    """--shift-px moves frames sideways within the slot (labels unchanged); a vision-only
    batch renders no audio."""
    import numpy as np
    from lab.data import TrainShards
    from lab.pretrain import AuxBatches
    from lab.trainset import question_vocab
    shards, vc = TrainShards(world / "data"), _tiny_config(world).vision
    plain = AuxBatches(shards, vc, question_vocab(), 80, seed=3)(0, 1, "cpu")
    moved = AuxBatches(shards, vc, question_vocab(), 80, seed=3, shift_px=40, parts=("vision",))(0, 1, "cpu")
    assert torch.equal(plain[1], moved[1]) and torch.equal(plain[2], moved[2])   # same frame, same labels
    assert all(x.numel() == 0 for x in moved[3:])                                 # no audio rendered
    prof = [x[0].mean(dim=(0, 1)) for x in (plain[0], moved[0])]                  # (W,) column profile
    err = {d: float((prof[0][max(0, -d):len(prof[0]) - max(0, d)] -
                     prof[1][max(0, d):len(prof[1]) - max(0, -d)]).abs().mean()) for d in range(-8, 9)}
    best = min(err, key=err.get)
    assert best != 0 and abs(best) <= 40 * vc.image_size[0] / 320 + 1, err
    with pytest.raises(ValueError, match="shift_px"):
        AuxBatches(shards, vc, question_vocab(), 80, shift_px=200)


def test_init_rebuilds_and_retrains_only_the_vision_encoder(world, tmp_path):
    from fusion.checkpoint import save_model
    from fusion.model import FusionModel
    torch.manual_seed(1)
    start = FusionModel(_tiny_config(world))
    save_model(start, tmp_path / "start.safetensors")
    run = tmp_path / "run"
    train_fusion(opts(world, run, stages=("encoders",), init=str(tmp_path / "start.safetensors"),
                      encoder_parts=("vision",), slot_heads="factorised", shift_px=20))
    a = start.state_dict()
    b = load_model(run / "after_encoders.safetensors", codec=load_codec(world / "codec")).state_dict()
    changed = {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])}
    assert changed == {"vision_encoder"}, changed
    hist = json.loads((run / "encoders.history.json").read_text())
    assert "acc_obj" in hist[0] and "beep" not in hist[0], hist[0]
    with pytest.raises(ValueError, match="shift_px"):
        FusionTrainOptions(shift_px=100)
    with pytest.raises(ValueError, match="encoder_parts"):
        FusionTrainOptions(encoder_parts=("eyes",))
    with pytest.raises(ValueError, match="--init"):
        FusionTrainOptions(encoder_parts=("vision",))          # the audio encoder would stay random
    with pytest.raises(FileNotFoundError, match="no such"):
        FusionTrainOptions(init=str(tmp_path / "missing.safetensors"))


def test_init_can_fine_tune_an_encoder_instead_of_rebuilding_it(world, tmp_path):
    """--no-rebuild-encoders: the encoders stage trains the --init checkpoint's audio encoder
    (a few small steps away from it), where the default starts it at random."""
    from fusion.checkpoint import save_model
    from fusion.model import FusionModel
    torch.manual_seed(1)
    start = FusionModel(_tiny_config(world))
    save_model(start, tmp_path / "start.safetensors")
    kw = dict(stages=("encoders",), init=str(tmp_path / "start.safetensors"), encoder_parts=("audio",))
    drift = {}
    for rebuild in (True, False):
        run = tmp_path / f"run{rebuild}"
        train_fusion(opts(world, run, rebuild_encoders=rebuild, **kw))
        b = load_model(run / "after_encoders.safetensors", codec=load_codec(world / "codec")).state_dict()
        a = start.state_dict()
        keys = [k for k in a if k.startswith("audio_encoder.") and a[k].is_floating_point()]
        drift[rebuild] = max(float((a[k] - b[k]).abs().max()) for k in keys)
        assert {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])} == {"audio_encoder"}
    assert drift[False] < 0.02 < drift[True], drift     # 3 Adam steps at lr 1e-3 vs a fresh init
    with pytest.raises(ValueError, match="--init"):
        FusionTrainOptions(rebuild_encoders=False)


def test_voice_augmentation_keeps_the_words_and_changes_the_voice(world):
    """--voice-aug: a question's mel is speed-perturbed, warped and masked, reproducibly; the
    word labels stay those of the question."""
    import numpy as np
    from lab.data import TrainShards
    from lab.pretrain import AuxBatches, augment_question
    from lab.trainset import question_vocab
    from speech.whisper_encoder import log_mel
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    a, b = (augment_question(x, np.random.default_rng(5), 80) for _ in range(2))
    assert torch.equal(a, b) and a.shape[0] == 80 and 90 <= a.shape[1] <= 112, a.shape
    plain = log_mel(x, 80)
    assert a.shape != plain.shape or not torch.allclose(a, plain, atol=1e-3)
    assert torch.isfinite(a).all()
    shards, vc = TrainShards(world / "data"), _tiny_config(world).vision
    p = AuxBatches(shards, vc, question_vocab(), 80, seed=3, parts=("audio",))(0, 2, "cpu")
    q = AuxBatches(shards, vc, question_vocab(), 80, seed=3, voice_aug=True, parts=("audio",))(0, 2, "cpu")
    assert torch.equal(p[-1], q[-1])                          # same questions, same word labels
    assert not torch.equal(p[-3], q[-3])                      # heard in another voice


def test_audio_retrain_reuses_the_frames_of_a_vision_cache(world, tmp_path):
    """--vision-cache: an audio-only retrain (here with --question-heads) takes the frame
    features from the --init run's cache and gives the same cache as encoding everything again."""
    first = tmp_path / "first"
    train_fusion(opts(world, first, stages=("align",), align_steps=1))
    init = str(first / "after_align.safetensors")
    kw = dict(stages=("encoders", "align"), align_steps=1, init=init, encoder_parts=("audio",), voice_aug=True,
              question_heads=True)
    train_fusion(opts(world, tmp_path / "fast", vision_cache=str(first / "cache.pt"), **kw))
    hist = json.loads((tmp_path / "fast" / "encoders.history.json").read_text())
    assert all(h["qwords"] > 0 for h in hist) and "acc_obj" not in hist[0], hist[0]
    train_fusion(opts(world, tmp_path / "full", **kw))
    old, fast, full = (torch.load(tmp_path / r / "cache.pt", weights_only=False) for r in ("first", "fast", "full"))
    assert len(fast) == len(full) == len(old)
    for o, a, b in zip(old, fast, full):
        assert torch.equal(a.feats.frames, b.feats.frames) and torch.equal(a.feats.frame_times, b.feats.frame_times)
        assert torch.allclose(a.feats.question.float(), b.feats.question.float(), atol=1e-2)
        assert not torch.allclose(a.feats.question.float(), o.feats.question.float(), atol=1e-2)  # new audio encoder
    # a cache from another vision encoder is refused, not silently mixed in
    from fusion.checkpoint import save_model
    from fusion.model import FusionModel
    torch.manual_seed(7)
    save_model(FusionModel(_tiny_config(world)), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        train_fusion(opts(world, tmp_path / "bad", **{**kw, "init": str(tmp_path / "other.safetensors")},
                          vision_cache=str(first / "cache.pt")))
    with pytest.raises(ValueError, match="--encoder-parts audio"):
        FusionTrainOptions(init=init, vision_cache=str(first / "cache.pt"))


def test_sft_adopts_a_codec_of_another_shape_and_replies_of_another_version(world, tmp_path):
    """A run aligned against one codec speaks another of another shape from sft on: fresh audio
    rows and one MCTP module per extra codebook, the text rows kept; --replies retrains the
    cached turns on another version's replies, spoken by the --answers dataset."""
    from lab.data import main
    from speech.codec import CodecConfig
    run = tmp_path / "run"
    train_fusion(opts(world, run, stages=("encoders", "align")))
    torch.manual_seed(0)
    save_codec(build_codec(CodecConfig(n_filters=4, dimension=16, lstm=1, bins=32, n_q=6)), tmp_path / "c6")
    v1 = tmp_path / "v1"
    main(v1, n_train_sessions=0, n_val_sessions=0, n_test_sessions=0, n_codec_sentences=0,
         n_codec_eval=0, replies="v1", workers=1, progress=False)
    later = dict(codec=str(tmp_path / "c6"), stages=("encoders", "align", "sft", "mctp"), replies="v1")
    with pytest.raises(ValueError, match="no answer audio for"):   # the data's answers are v2
        train_fusion(opts(world, run, **later))
    final = train_fusion(opts(world, run, answers=str(v1), **later))
    aligned = load_model(run / "after_align.safetensors", codec=load_codec(world / "codec"))
    model = load_model(final, codec=load_codec(tmp_path / "c6"))
    assert (model.config.codec.n_q, model.config.codec.bins) == (6, 32)
    assert len(aligned.mctp) == 3 and len(model.mctp) == 5
    # the adoption itself (sft then trains the embedding): text rows and the first MCTP modules kept
    from lab.train_fusion import _adopt_codec
    adopted = _adopt_codec(aligned, load_codec(tmp_path / "c6"), audio_trained=False)
    keep = aligned.layout.audio_base                     # text ids, ASSISTANT and EOA
    assert adopted.embed.weight.shape[0] == keep + 6 * 32 == model.embed.weight.shape[0]
    assert torch.equal(adopted.embed.weight[:keep], aligned.embed.weight[:keep])
    a, b = aligned.state_dict(), adopted.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "embed.weight")   # mctp.modules_.0-2 too
    with pytest.raises(ValueError, match="same codec or a new --run-dir"):
        _adopt_codec(model, load_codec(world / "codec"), audio_trained=True)
    with pytest.raises(FileNotFoundError, match="answers.json"):
        FusionTrainOptions(answers=str(tmp_path))
    with pytest.raises(ValueError, match="reply version"):
        FusionTrainOptions(replies="v3")


def test_swapped_replies_keep_their_question_type_and_drop_their_text():
    from types import SimpleNamespace

    import numpy as np

    from lab.train_fusion import swap_answers, swap_pool
    ex = [SimpleNamespace(qtype=t, answer=a) for t, a in
          [("what_color", "The square is red."), ("what_color", "The circle is blue."),
           ("pitch", "It was high."), ("pitch", "It was low."), ("count_beeps", "I heard one beep.")]]
    pool = swap_pool(ex)
    assert pool["pitch"] == ["It was high.", "It was low."] and len(pool["count_beeps"]) == 1
    rng = np.random.default_rng(0)
    said, text_on = swap_answers(ex, pool, 0.0, rng)
    assert said == [e.answer for e in ex] and text_on.all()
    said, text_on = swap_answers(ex, pool, 0.999999, rng)
    assert text_on.tolist() == [False, False, False, False, True]   # one-reply types stay
    assert said[:4] == ["The circle is blue.", "The square is red.", "It was low.", "It was high."]
    shares = [1 - swap_answers(ex[:4], pool, 0.3, rng)[1].float().mean().item() for _ in range(400)]
    assert 0.25 < float(np.mean(shares)) < 0.35


def test_sft_and_mctp_train_with_swapped_replies(world, tmp_path):
    final = train_fusion(opts(world, tmp_path / "run", swap_replies=0.5))
    assert load_model(final, codec=load_codec(world / "codec")) is not None
    with pytest.raises(ValueError, match="swap_replies"):
        FusionTrainOptions(swap_replies=1.0)
