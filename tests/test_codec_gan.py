"""Adversarial decoder fine-tuning (lab.codec_gan) and moving a fusion model onto its codec."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion.checkpoint import (CheckpointError, load_with_codec, rebind_codec, read_header,
                               same_codes, save_model)
from fusion.config import preset
from fusion.model import FusionModel
from lab.codec_gan import (GanOptions, discriminator_loss, finetune_decoder, generator_losses)
from lab.train_codec import init_weights, make_codec_corpus
from speech.codec import build_codec, load_codec, save_codec

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(steps=6, batch=2, segment_seconds=0.32, disc_filters=4, disc_warmup=2, eval_every=3,
            checkpoint_every=2, threads=1, recognize=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_codec_corpus(tmp_path_factory.mktemp("corpus"), n=4, seed=0, n_eval=2)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    torch.manual_seed(0)
    codec = build_codec("tiny")
    init_weights(codec.model)
    return save_codec(codec, tmp_path_factory.mktemp("init"), half=True)


@pytest.fixture(scope="module")
def tuned(corpus, init, tmp_path_factory):
    out = tmp_path_factory.mktemp("gan")
    return out, finetune_decoder(init, corpus, out, GanOptions(**TINY), progress=False)


def test_finetuning_changes_the_decoder_and_keeps_every_code(init, tuned):
    out, result = tuned
    old, new = load_codec(init), load_codec(out)
    torch.manual_seed(1)
    wav = torch.randn(2, 1, 6400) * 0.1
    assert torch.equal(old.encode(wav), new.encode(wav))        # the same codes ...
    codes = old.encode(wav)
    assert not torch.allclose(old.decode(codes), new.decode(codes))   # ... heard differently
    assert same_codes(old, new) and new.spec.fingerprint != old.spec.fingerprint
    assert new.name == "tiny-gan"
    # the discriminator alone for disc_warmup steps, then the decoder learns against it
    assert [h["adv"] == 0 for h in result.history] == [True, True, False, False, False, False]
    assert all(h["feat"] > 0 for h in result.history[2:])
    report = json.loads((out / "report.json").read_text())
    assert report["adversarial"]["steps"] == 6 and report["options"]["disc_filters"] == 4
    assert [e["step"] for e in report["evals"]] == [0, 3, 6]
    assert (out / "loss.png").stat().st_size > 1000


def test_resume_goes_on_from_the_checkpoint(corpus, init, tmp_path):
    first = finetune_decoder(init, corpus, tmp_path, GanOptions(**dict(TINY, steps=4)),
                             progress=False)
    resumed = finetune_decoder(init, corpus, tmp_path, GanOptions(**TINY), progress=False,
                               resume=True)
    assert resumed.steps == 6 and resumed.history[:4] == first.history
    assert [h["step"] for h in resumed.history] == list(range(1, 7))


def test_losses():
    real, fake = [torch.full((1, 1, 4, 4), 2.0)], [torch.full((1, 1, 4, 4), -2.0)]
    assert discriminator_loss(real, fake).item() == 0                   # both past the margin
    assert discriminator_loss(fake, real).item() == pytest.approx(6.0)  # 3 + 3
    fmaps = [[torch.ones(1, 2, 3, 3), torch.full((1, 2, 3, 3), -2.0)]]
    adv, feat = generator_losses([torch.zeros(1, 1, 4, 4)], fmaps, fmaps)
    assert adv.item() == 1.0 and feat.item() == 0
    shifted = [[fmaps[0][0] + 0.5, fmaps[0][1]]]
    assert generator_losses(real, fmaps, shifted)[1].item() == pytest.approx(0.25)  # 0.5/1 / 2


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps"), (dict(disc_filters=0), "disc_filters"), (dict(lr=0), "lr"),
    (dict(w_adv=0, w_feat=0), "nothing adversarial"), (dict(w_adv=-1), "w_adv"),
    (dict(stft_sizes=(300,)), "stft_sizes"), (dict(device="tpu"), "device")])
def test_bad_options_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        GanOptions(**bad)


def test_out_must_differ_from_the_codec_it_tunes(corpus, init):
    with pytest.raises(ValueError, match="another directory"):
        finetune_decoder(init, corpus, init, GanOptions(**TINY), progress=False)


def test_rebind_moves_a_model_to_the_new_codec_and_refuses_other_codes(init, tuned, tmp_path):
    out, _ = tuned
    old, new = load_codec(init), load_codec(out)
    model = FusionModel(preset("tiny", old.spec))
    src = save_model(model, tmp_path / "m.safetensors", half=True)
    moved = rebind_codec(src, new, tmp_path / "moved" / "fusion.safetensors", old_codec=old)
    assert read_header(moved)[0].codec == new.spec
    save_codec(new, tmp_path / "moved" / "codec")
    loaded, codec = load_with_codec(moved)                   # finds the codec beside it
    assert codec.spec == new.spec
    for k, v in model.state_dict().items():                   # every weight as it was
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    torch.manual_seed(2)
    other = build_codec("tiny")                               # other codebooks: refused
    with pytest.raises(CheckpointError, match="same codes"):
        rebind_codec(src, other, tmp_path / "x.safetensors", old_codec=old)
    with pytest.raises(CheckpointError, match="codec mismatch"):   # old_codec is not its codec
        rebind_codec(src, new, tmp_path / "x.safetensors", old_codec=other)


def test_cli_finetunes_and_rebinds(corpus, init, tmp_path):
    old = load_codec(init)
    src = save_model(FusionModel(preset("tiny", old.spec)), tmp_path / "m.safetensors")
    cmd = [sys.executable, "run.py", "train", "codec", "--data", str(corpus), "--out",
           str(tmp_path / "gan"), "--steps", "3", "--batch", "2", "--segment-seconds", "0.32",
           "--disc-filters", "4", "--threads", "1", "--no-recognizer"]
    r = subprocess.run(cmd + ["--init", str(init)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "--adversarial" in r.stderr
    torch.manual_seed(5)                          # a model of another codec: refused before training
    alien = save_model(FusionModel(preset("tiny", build_codec("tiny").spec)), tmp_path / "a.safetensors")
    r = subprocess.run(cmd + ["--adversarial", "--init", str(init), "--model", str(alien)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "codec mismatch" in r.stderr
    assert not (tmp_path / "gan").exists()
    r = subprocess.run(cmd + ["--adversarial", "--init", str(init), "--model", str(src)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bound to the new codec" in r.stdout
    new = load_codec(tmp_path / "gan")
    assert read_header(tmp_path / "gan" / "fusion.safetensors")[0].codec == new.spec
