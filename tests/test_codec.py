"""Codec wrapper, checkpoints and the streaming decoder (tiny random models, CPU)."""

import json
import math
import time
import urllib.request

import pytest
import torch
from encodec import EncodecModel

from speech.codec import (CODEC_PRESETS, Codec, CodecConfig, CodecSpec, build_codec, load_codec,
                          save_codec)
from speech.streaming_codec import StreamingDecoder

N_FRAMES = 150


@pytest.fixture(scope="module")
def tiny() -> Codec:
    torch.manual_seed(0)
    return build_codec("tiny")


@pytest.fixture(scope="module")
def causal24() -> Codec:
    """The pretrained model's architecture (causal 24 kHz EnCodec) with random weights."""
    torch.manual_seed(1)
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    # Untrained EnCodec codebooks are all zero until k-means runs on the first batch; give them
    # random entries so that different codes decode to different audio.
    for layer in model.quantizer.vq.layers:
        layer._codebook.embed.normal_()
    return Codec(model, 8, name="encodec_24khz_random")


@pytest.fixture(params=["tiny", "causal24"])
def codec(request) -> Codec:
    return request.getfixturevalue(request.param)


def random_codes(codec: Codec, frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, codec.bins, (batch, codec.n_q, frames), generator=g)


def stream(dec: StreamingDecoder, codes: torch.Tensor, chunk: int) -> torch.Tensor:
    parts = [dec.decode(codes[..., i:i + chunk]) for i in range(0, codes.shape[-1], chunk)]
    for part, i in zip(parts, range(0, codes.shape[-1], chunk)):
        assert part.shape[-1] == min(chunk, codes.shape[-1] - i) * dec.codec.hop_length
    return torch.cat(parts, dim=-1)


# --- config / presets / spec --------------------------------------------------------------
def test_presets_and_config_validation():
    demo, tiny_cfg = CODEC_PRESETS["demo"], CODEC_PRESETS["tiny"]
    assert (demo.sample_rate, demo.hop_length, demo.frame_rate) == (16000, 640, 25.0)
    assert (demo.n_q, demo.bins, demo.causal) == (4, 256, True)
    assert (tiny_cfg.n_filters, tiny_cfg.dimension, tiny_cfg.lstm, tiny_cfg.bins) == (4, 16, 1, 64)
    assert CodecConfig.from_dict(json.loads(json.dumps(demo.to_dict()))) == demo
    with pytest.raises(ValueError, match="power of 2"):
        CodecConfig(bins=1000)
    with pytest.raises(ValueError, match="ratios"):
        CodecConfig(ratios=())
    with pytest.raises(ValueError, match="norm"):
        CodecConfig(norm="time_group_norm")
    with pytest.raises(ValueError, match="unknown codec config keys"):
        CodecConfig.from_dict({"sample_rate": 16000, "hop": 320})
    assert build_codec(CODEC_PRESETS["tiny"]).spec.name == "tiny"
    assert build_codec(CodecConfig(**{**tiny_cfg.to_dict(), "n_q": 2})).spec.name == "custom"
    with pytest.raises(ValueError, match="unknown codec preset"):
        build_codec("huge")


def test_codec_properties_and_spec(tiny, causal24):
    assert (tiny.sample_rate, tiny.hop_length, tiny.frame_rate, tiny.n_q, tiny.bins) == (
        16000, 320, 50.0, 4, 64)
    assert (causal24.sample_rate, causal24.hop_length, causal24.frame_rate, causal24.n_q) == (
        24000, 320, 75.0, 8)
    spec = tiny.spec
    assert spec == CodecSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert len(spec.fingerprint) == 16 and int(spec.fingerprint, 16) >= 0
    with pytest.raises(ValueError, match="keys"):
        CodecSpec.from_dict({"name": "x"})


def test_fingerprint_follows_weights():
    torch.manual_seed(0)
    a = build_codec("tiny")
    torch.manual_seed(1)
    b = build_codec("tiny")
    before = a.spec.fingerprint
    assert before != b.spec.fingerprint
    with torch.no_grad():
        next(a.model.decoder.parameters())[0].add_(1e-3)
    assert a.spec.fingerprint != before


# --- encode / decode ----------------------------------------------------------------------
def test_encode_decode_shapes(tiny):
    wav = torch.randn(2, 1, 16000 + 5) * 0.1
    codes = tiny.encode(wav)
    assert codes.dtype == torch.long and codes.shape == (2, 4, math.ceil(16005 / 320))
    assert 0 <= int(codes.min()) and int(codes.max()) < tiny.bins
    audio = tiny.decode(codes)
    assert audio.shape == (2, 1, codes.shape[-1] * 320) and audio.dtype == torch.float32


def test_encode_and_decode_validate_inputs(tiny):
    with pytest.raises(ValueError, match="1-channel audio, got 2 channels"):
        tiny.encode(torch.zeros(1, 2, 3200))
    with pytest.raises(ValueError, match=r"\(batch, channels, samples\)"):
        tiny.encode(torch.zeros(1, 3200))
    with pytest.raises(ValueError, match="float audio"):
        tiny.encode(torch.zeros(1, 1, 3200, dtype=torch.int16))
    with pytest.raises(ValueError, match="n_q=4"):
        tiny.decode(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny.decode(torch.full((1, 4, 5), 64))
    with pytest.raises(ValueError, match="integer"):
        tiny.decode(torch.zeros(1, 4, 5))


# --- streaming decoder --------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 75])
def test_streaming_equals_offline(codec, chunk):
    codes = random_codes(codec, N_FRAMES)
    offline = codec.decode(codes)
    assert offline.abs().max() > 1e-3  # the comparison is not between two silences
    streamed = stream(codec.streaming_decoder(), codes, chunk)
    assert streamed.shape == offline.shape == (1, 1, N_FRAMES * codec.hop_length)
    assert (streamed - offline).abs().max().item() <= 1e-4


def test_streaming_batch_and_reset(tiny):
    codes = random_codes(tiny, 40, batch=3, seed=2)
    dec = tiny.streaming_decoder(batch=3)
    first = stream(dec, codes, 4)
    assert (first - tiny.decode(codes)).abs().max().item() <= 1e-4
    dec.reset()
    again = stream(dec, codes, 9)
    assert (again - first).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="batch 3"):
        dec.decode(codes[:1, :, :2])


def test_later_codes_never_change_earlier_audio(codec):
    k, frames = 12, 30
    codes = random_codes(codec, frames, seed=3)
    changed = codes.clone()
    changed[..., k:] = random_codes(codec, frames - k, seed=4)
    cut = k * codec.hop_length
    a = stream(codec.streaming_decoder(), codes, 5)
    b = stream(codec.streaming_decoder(), changed, 5)
    assert torch.equal(a[..., :cut], b[..., :cut])
    assert not torch.allclose(a[..., cut:], b[..., cut:])
    offline_a, offline_b = codec.decode(codes), codec.decode(changed)  # offline is causal too
    assert torch.equal(offline_a[..., :cut], offline_b[..., :cut])


def test_streaming_state_does_not_grow(tiny):
    dec = tiny.streaming_decoder()
    initial = dec.state_numel()
    assert initial > 0
    codes = random_codes(tiny, 1000, seed=5)
    for i in range(10):
        dec.decode(codes[..., i:i + 1])
    after_10_chunks = dec.state_numel()
    dec.reset()
    for i in range(0, 1000, 8):
        dec.decode(codes[..., i:i + 8])
    assert dec.frames == 1000
    assert initial == after_10_chunks == dec.state_numel()


def test_streaming_refuses_non_causal_and_normalized_codecs(tiny):
    non_causal = build_codec(CodecConfig(**{**CODEC_PRESETS["tiny"].to_dict(), "causal": False}))
    assert non_causal.decode(random_codes(non_causal, 3)).shape == (1, 1, 3 * 320)
    with pytest.raises(ValueError, match="not causal"):
        non_causal.streaming_decoder()
    model = build_codec("tiny").model
    model.normalize = True
    with pytest.raises(ValueError, match="normali"):
        Codec(model)
    wrapped = build_codec("tiny")
    wrapped.model.segment = 1.0
    with pytest.raises(ValueError, match="segment"):
        wrapped.streaming_decoder()


# --- checkpoints --------------------------------------------------------------------------
def test_save_load_round_trip(tiny, tmp_path):
    folder = save_codec(tiny, tmp_path / "codec")
    assert sorted(p.name for p in folder.iterdir()) == ["codec.json", "codec.safetensors"]
    meta = json.loads((folder / "codec.json").read_text())
    assert (meta["format"], meta["version"]) == ("tandem-codec", 1)
    assert CodecConfig.from_dict(meta["config"]) == tiny.config
    for where in (folder, folder / "codec.safetensors"):
        loaded = load_codec(where)
        assert loaded.config == tiny.config and loaded.spec == tiny.spec
        codes = random_codes(tiny, 20, seed=6)
        assert torch.equal(loaded.decode(codes), tiny.decode(codes))
        wav = torch.randn(1, 1, 4000) * 0.1
        assert torch.equal(loaded.encode(wav), tiny.encode(wav))


def test_half_save_is_smaller_and_loads_with_the_same_spec(tmp_path):
    full, half = build_codec("tiny"), build_codec("tiny")
    half.model.load_state_dict(full.model.state_dict())
    size32 = (save_codec(full, tmp_path / "c32") / "codec.safetensors").stat().st_size
    spec_before = half.spec
    folder = save_codec(half, tmp_path / "c16", half=True)
    assert (folder / "codec.safetensors").stat().st_size < 0.6 * size32
    assert half.spec != spec_before                       # rounded in place...
    loaded = load_codec(folder)
    assert loaded.spec == half.spec                       # ...to exactly what loads back
    assert json.loads((folder / "codec.json").read_text())["spec"] == half.spec.to_dict()
    codes = random_codes(full, 20, seed=6)
    a, b = full.decode(codes), loaded.decode(codes)
    assert (a - b).abs().max() < 1e-2 * a.abs().max() + 1e-4


def test_load_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="run.py train codec") as err:
        load_codec(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    folder = save_codec(tiny, tmp_path / "codec")
    (folder / "codec.safetensors").write_bytes(b"\x13garbage" * 100)
    with pytest.raises(ValueError, match="corrupt"):
        load_codec(folder)
    folder = save_codec(tiny, tmp_path / "codec2")
    (folder / "codec.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_codec(folder)
    with pytest.raises(ValueError, match="bandwidth"):
        load_codec("encodec_24khz", bandwidth=5.0)


def test_pretrained_24khz_without_network(tmp_path, monkeypatch):
    """The real encodec loader, with an empty torch hub cache and every URL routed to a closed
    local port (no network): fails fast with a RuntimeError that says how to fix it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    closed = "http://127.0.0.1:9"
    offline = urllib.request.build_opener(urllib.request.ProxyHandler(
        {"http": closed, "https": closed}))
    monkeypatch.setattr(urllib.request, "_opener", offline)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        load_codec("encodec_24khz")
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "network" in message and "encodec_model_24khz()" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "encodec_24khz-d7cc33bc.th") \
        in message


def test_pretrained_24khz_from_torch_hub_cache(causal24, tmp_path, monkeypatch):
    """The real loader reads a file already in the torch hub cache (random weights here, same
    format as the downloaded checkpoint), at 6 kbps = 8 codebooks unless told otherwise."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(causal24.model.state_dict(), cache / "encodec_24khz-d7cc33bc.th")
    codec = load_codec("encodec_24khz")
    assert (codec.name, codec.sample_rate, codec.frame_rate, codec.n_q, codec.bins) == (
        "encodec_24khz", 24000, 75.0, 8, 1024)
    assert codec.config is None and codec.spec.fingerprint == causal24.spec.fingerprint
    codes = random_codes(codec, 10, seed=7)
    assert torch.equal(codec.decode(codes), causal24.decode(codes))
    assert load_codec("encodec_24khz", bandwidth=1.5).n_q == 2
    with pytest.raises(ValueError, match="only project codecs"):
        save_codec(codec, tmp_path / "out")
