"""speech.whisper_encoder and speech.asr on tiny random checkpoints in Whisper's own format."""
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from speech.asr import ASRUnavailable, WhisperASR
from speech.whisper_encoder import (AudioEncoder, AudioEncoderConfig, load_whisper_encoder,
                                    log_mel)

SR = 16_000
DIMS = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2,
                       n_audio_layer=2, n_vocab=51864, n_text_ctx=32, n_text_state=64,
                       n_text_head=2, n_text_layer=1)


@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory):
    """A random Whisper (English-only vocabulary) saved exactly as the whisper package's
    downloads are: {"dims": dict, "model_state_dict": {encoder.*, decoder.*}}."""
    torch.manual_seed(0)
    model = Whisper(DIMS)
    # whisper leaves the decoder's positional embedding as torch.empty (real checkpoints fill
    # it): uninitialised memory, NaN at times, and NaN != NaN in the weight comparison below
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    path = tmp_path_factory.mktemp("whisper") / "tiny-random.pt"
    torch.save({"dims": asdict(DIMS), "model_state_dict": model.state_dict()}, path)
    return path, model


def speechlike(seconds, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (x + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def test_log_mel_frame_convention():
    for n in (201, 16000, 16159, 16160, 36_800):
        assert log_mel(speechlike(n / SR)).shape == (80, n // 160)
    assert log_mel(torch.from_numpy(speechlike(1.0)), n_mels=128).shape == (128, 100)
    ref = whisper.log_mel_spectrogram(speechlike(1.0))
    torch.testing.assert_close(log_mel(speechlike(1.0)), ref)
    with pytest.raises(ValueError, match="more than 200 samples"):
        log_mel(np.zeros(200, np.float32))
    with pytest.raises(ValueError, match="to_mono"):
        log_mel(np.zeros((1600, 2), np.float32))


def test_config_presets_and_validation():
    assert AudioEncoderConfig.preset("tiny").n_state == 64
    demo = AudioEncoderConfig.preset("demo")
    assert (demo.n_state, demo.n_layer, demo.n_head) == (192, 3, 3)
    assert AudioEncoderConfig.from_whisper_dims(DIMS) == AudioEncoderConfig.from_whisper_dims(
        asdict(DIMS)) == AudioEncoderConfig(80, 1500, 64, 2, 2)
    with pytest.raises(ValueError, match="divisible"):
        AudioEncoderConfig(n_state=64, n_head=3)
    with pytest.raises(ValueError, match="preset"):
        AudioEncoderConfig.preset("huge")


def test_encoder_matches_whisper_on_30_s(fake_checkpoint):
    path, ref_model = fake_checkpoint
    enc, cfg = load_whisper_encoder(path)
    assert cfg == AudioEncoderConfig(80, 1500, 64, 2, 2) and not enc.training
    assert set(enc.state_dict()) == {k[8:] for k in ref_model.state_dict()
                                     if k.startswith("encoder.")}
    mel = whisper.log_mel_spectrogram(speechlike(12.0), padding=whisper.audio.N_SAMPLES)
    mel = whisper.pad_or_trim(mel, whisper.audio.N_FRAMES)[None]      # (1, 80, 3000)
    with torch.no_grad():
        ours, theirs = enc(mel), ref_model.encoder(mel)
    assert ours.shape == theirs.shape == (1, 1500, 64)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_variable_length_and_padded_batches(fake_checkpoint):
    enc, _ = load_whisper_encoder(fake_checkpoint[0])
    mels = [log_mel(speechlike(s, seed=i)) for i, s in enumerate((2.3, 0.71, 1.0))]
    assert [m.shape[1] for m in mels] == [230, 71, 100]
    with torch.no_grad():
        alone = [enc(m[None])[0] for m in mels]
        assert [a.shape[0] for a in alone] == [115, 36, 50]
        batch = torch.zeros(3, 80, 230) - 3.0  # padding value must not matter
        for i, m in enumerate(mels):
            batch[i, :, :m.shape[1]] = m
        lengths = torch.tensor([m.shape[1] for m in mels])
        out = enc(batch, lengths)
    assert out.shape == (3, 115, 64)
    assert enc.output_lengths(lengths).tolist() == [115, 36, 50]
    for i, a in enumerate(alone):
        torch.testing.assert_close(out[i, :a.shape[0]], a, atol=1e-5, rtol=1e-5)
        assert out[i, a.shape[0]:].abs().max() == 0 if a.shape[0] < 115 else True


def test_encoder_rejects_bad_input():
    enc = AudioEncoder(AudioEncoderConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match="batch dimension"):
        enc(torch.zeros(80, 100))
    with pytest.raises(ValueError, match="split longer audio"):
        enc(torch.zeros(1, 80, 3001))
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.zeros(2, 80, 100), torch.tensor([100, 101]))
    assert enc(torch.zeros(1, 80, 3000)).shape == (1, 1500, 64)


def test_whisper_model_names_fail_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))      # an empty whisper cache
    t0 = time.monotonic()
    with pytest.raises(ASRUnavailable) as e:
        WhisperASR("base.en")
    msg = str(e.value)
    assert "whisper.load_model('base.en')" in msg and "--asr-model PATH" in msg
    assert time.monotonic() - t0 < 5
    with pytest.raises(ASRUnavailable, match="no such file"):
        WhisperASR(str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="neither a Whisper model name"):
        load_whisper_encoder(tmp_path / "missing.pt")


def test_encoder_download_path_reports_how_to_fetch(monkeypatch, tmp_path):
    # the whisper package's real download (no network here: it fails) -> actionable error
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(RuntimeError) as e:
        load_whisper_encoder("tiny.en")
    assert "whisper.load_model('tiny.en')" in str(e.value)
    assert "local Whisper checkpoint path" in str(e.value)


def test_asr_loads_a_local_checkpoint_and_transcribes(fake_checkpoint):
    asr = WhisperASR(str(fake_checkpoint[0]), device="cpu")
    assert asr.language == "en"
    text = asr.transcribe(speechlike(1.0))
    # random weights: the text is noise, but the checkpoint's own noise: whisper's transcribe
    # on the saved model (same greedy options) says the same, and a different model does not
    ref = fake_checkpoint[1].transcribe(speechlike(1.0), fp16=False, temperature=0.0,
                                        language="en", condition_on_previous_text=False,
                                        verbose=None)["text"].strip()
    assert text == ref and text, (text, ref)
    # ...and it is the checkpoint's model: the same weights, unlike another random one
    saved = fake_checkpoint[1].state_dict()
    loaded = asr.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k].cpu(), loaded[k].cpu()) for k in saved)
    torch.manual_seed(1)
    other = Whisper(DIMS).state_dict()
    assert not all(torch.equal(saved[k].cpu(), other[k].cpu()) for k in saved)
    with pytest.raises(ValueError, match="resample"):
        asr.transcribe(speechlike(1.0), sample_rate=24_000)
