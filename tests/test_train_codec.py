"""Codec training (tiny preset, a few espeak-ng utterances) and the independent recogniser."""
import json

import numpy as np
import pytest
import torch

from lab.train_codec import (CHECKPOINT, CodecTrainOptions, _revive_dead_codes,
                                codebook_stats, learning_rate, make_codec_corpus, quantize_train,
                                si_snr,
                                train_codec)
from speech.codec import build_codec, load_codec

TINY = dict(preset="tiny", batch=2, segment_seconds=0.32, lr=3e-3, eval_every=10,
            checkpoint_every=5, threads=1, recognize=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_codec_corpus(tmp_path_factory.mktemp("corpus"), n=6, seed=0, n_eval=2)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("codec")
    return out, train_codec(corpus, out, CodecTrainOptions(steps=30, **TINY), progress=False)


def test_corpus_layout(corpus):
    meta = json.loads((corpus / "sentences.json").read_text())
    assert len(meta["train"]) == 6 and len(meta["eval"]) == 2
    assert all((corpus / e["file"]).is_file() for e in meta["train"] + meta["eval"])
    assert not {e["text"] for e in meta["eval"]} & {e["text"] for e in meta["train"]}


def test_tiny_run_decreases_loss_and_saves_a_loadable_codec(trained):
    out, result = trained
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30 and result.steps == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    codec = load_codec(out)
    assert codec.spec.to_dict() == result.report["codec"] and codec.name == "tiny"
    wav = torch.randn(1, 1, 3200) * 0.1
    y = codec.decode(codec.encode(wav))
    assert y.shape == (1, 1, 3200) and torch.isfinite(y).all()
    assert (out / "loss.png").stat().st_size > 1000
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 30 and report["heldout"]["utterances"] == 2
    assert report["voice"] == {"engine": "piper", "name": "en_US-joe-medium"}  # its corpus'
    assert len(report["heldout"]["codebooks"]) == codec.n_q
    assert "disabled" in report["heldout"]["recognizer"]["skipped"]
    assert [e["step"] for e in report["evals"]] == [10, 20, 30]
    assert len(report["codebooks_train_recent"]) == codec.n_q


def test_resume_continues_from_the_saved_step(corpus, tmp_path):
    first = train_codec(corpus, tmp_path, CodecTrainOptions(steps=8, **TINY), progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 8 and len(state["history"]) == 8
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / CHECKPOINT).write_bytes((tmp_path / CHECKPOINT).read_bytes())
    resumed = train_codec(corpus, tmp_path, CodecTrainOptions(steps=12, **TINY),
                          progress=False, resume=True)
    assert resumed.steps == 12 and [h["step"] for h in resumed.history] == list(range(1, 13))
    assert resumed.history[:8] == first.history and resumed.report["steps_this_run"] == 4
    assert load_codec(tmp_path).spec.fingerprint != first.report["codec"]["fingerprint"]
    # the same checkpoint resumed again gives the same steps (data order, optimizer, RNGs)
    again = train_codec(corpus, tmp_path / "copy", CodecTrainOptions(steps=12, **TINY),
                        progress=False, resume=True)
    assert again.history == resumed.history
    # it went on from the trained weights, not from scratch
    fresh = train_codec(corpus, tmp_path / "fresh", CodecTrainOptions(steps=4, **TINY),
                        progress=False)
    assert np.mean([h["loss"] for h in resumed.history[8:]]) < \
        np.mean([h["loss"] for h in fresh.history])


def test_resume_refuses_another_codec_shape(corpus, trained):
    out, _ = trained
    other = dict(TINY, preset="demo")
    with pytest.raises(ValueError, match="preset"):
        train_codec(corpus, out, CodecTrainOptions(steps=31, **other), progress=False,
                    resume=True)


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps"), (dict(batch=-1), "batch"), (dict(lr=0), "lr"),
    (dict(segment_seconds=float("nan")), "segment_seconds"), (dict(preset="huge"), "preset"),
    (dict(adversarial=True), "adversarial"), (dict(stft_sizes=(300,)), "stft_sizes"),
    (dict(w_time=0, w_logmel=0, w_mel=0), "reconstruction"), (dict(w_commit=-1), "w_commit"),
    (dict(time_limit_minutes=0), "time_limit"), (dict(threads=0), "threads"),
    (dict(device="tpu"), "device"), (dict(answer_fraction=1.5), "answer_fraction"),
    (dict(betas=(1.0, 0.9)), "betas")])
def test_bad_options_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        CodecTrainOptions(**bad)


def test_missing_corpus_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.py data"):
        train_codec(tmp_path, tmp_path / "out", CodecTrainOptions(steps=1, **TINY))


def test_dead_codes_are_revived_with_batch_vectors():
    torch.manual_seed(0)
    layer = build_codec("tiny").model.quantizer.vq.layers[0]
    cb = layer._codebook
    cb.cluster_size.fill_(5.0)
    cb.cluster_size[:3] = 0.0
    residual = torch.randn(2, cb.embed.shape[1], 10)                 # (B, D, F)
    assert _revive_dead_codes(cb, residual, threshold=1.0) == 3
    vectors = residual.transpose(1, 2).reshape(-1, residual.shape[1])
    for i in range(3):
        assert (cb.embed[i] == vectors).all(dim=1).any()
        torch.testing.assert_close(cb.embed_avg[i] / cb.cluster_size[i], cb.embed[i])
    assert (cb.cluster_size[:3] >= 1.0).all() and (cb.cluster_size[3:] == 5.0).all()


def test_learning_rate_schedule():
    o = CodecTrainOptions(steps=1000, lr=1e-3)
    assert learning_rate(o, 0, 0.0) == pytest.approx(1e-3 / 50)
    assert learning_rate(o, 49, 0.0) == pytest.approx(1e-3, rel=1e-2)
    assert learning_rate(o, 999, 0.0) == pytest.approx(1e-4, rel=1e-3)
    timed = CodecTrainOptions(steps=1000, lr=1e-3, time_limit_minutes=1)
    assert learning_rate(timed, 100, 60.0) == pytest.approx(1e-4)   # out of time: decayed


def test_codebooks_learn_by_ema_and_stay_in_use():
    torch.manual_seed(0)
    quantizer = build_codec("tiny").model.quantizer.train()   # 4 codebooks of 64, dim 16
    centers = torch.randn(32, 16) * 3

    def batch():                                                  # (B, D, F) around 32 centres
        x = centers[torch.randint(32, (4, 50))] + 0.1 * torch.randn(4, 50, 16)
        return x.transpose(1, 2)

    first = quantizer.vq.layers[0]
    x = batch()
    err0 = ((first.decode(first.encode(x)) - x) ** 2).mean()
    revived = sum(quantize_train(quantizer, batch(), 0.25)[3] for _ in range(150))
    err = ((first.decode(first.encode(x)) - x) ** 2).mean()
    assert revived > 0 and err < 0.05 * err0, (revived, float(err), float(err0))
    codes = first.encode(centers[None].transpose(1, 2))          # one code per centre
    assert len(set(codes.reshape(-1).tolist())) >= 28


def test_whole_frames_keep_the_last_frames_samples():
    from lab.train_codec import decode_whole, reconstruct
    codec = build_codec("tiny")
    wave = np.random.default_rng(0).normal(0, 0.1, 1000).astype(np.float32)
    whole, (trimmed, codes) = decode_whole(codec, wave), reconstruct(codec, wave)
    assert len(trimmed) == 1000 and len(whole) == codes.shape[1] * codec.hop_length > 1000
    assert np.allclose(whole[:1000], trimmed)


def test_metrics():
    x = np.sin(np.arange(16000) / 7.0).astype(np.float32)
    assert si_snr(x, 3 * x) > 60
    assert abs(si_snr(x, x + 0.1 * np.random.default_rng(0).standard_normal(16000)) - 17.0) < 0.5
    stats = codebook_stats([np.array([5.0, 5.0, 0, 0]), np.array([1.0, 0, 0, 0])])
    assert stats[0] == {"used": 0.5, "perplexity": 2.0, "bins": 4}
    assert stats[1]["perplexity"] == 1.0


def test_word_scoring():
    from speech.recognizer import is_recognized, matched_words, normalize_text, word_errors
    assert normalize_text("The 3 red, circles!") == ["the", "three", "red", "circles"]
    assert is_recognized("three.", "3") and not is_recognized("two.", "to")
    assert word_errors("the red circle.", "The band circle.") == (1, 3)
    assert word_errors("on the left.", "") == (3, 3)
    assert matched_words("on the left.", "on the the the left left") == (3, 3)
    assert matched_words("the red circle.", "circle red the") == (1, 3)


def test_cli_trains_a_codec(corpus, tmp_path, capsys):
    import run
    args = run.build_parser().parse_args(
        ["train", "codec", "--data", str(corpus), "--out", str(tmp_path), "--preset", "tiny",
         "--steps", "3", "--batch", "2", "--segment-seconds", "0.32", "--threads", "1",
         "--no-recognizer"])
    args.func(args)
    assert "after 3 steps" in capsys.readouterr().out
    assert load_codec(tmp_path).name == "tiny"
    fusion = run.build_parser().parse_args(["train", "fusion", "--data", "d", "--threads", "1"])
    assert (fusion.what, fusion.data, fusion.threads) == ("fusion", "d", 1)


def test_independent_recognizer_transcribes_espeak():
    from speech.recognizer import IndependentRecognizer, normalize_text
    from speech.tts import ESPEAK_AGENT_VOICE, synthesize
    text = IndependentRecognizer().transcribe(synthesize("the red circle", ESPEAK_AGENT_VOICE))
    assert normalize_text(text) == ["the", "red", "circle"], text


def test_codec_report_scores_recognition_and_dnsmos_before_and_after():
    """The held-out report: the recogniser and DNSMOS on each utterance as spoken and after the
    codec (a random codec garbles it: heard right before, not after; quality drops)."""
    from lab.spoken_eval import Dnsmos
    from lab.train_codec import evaluate_codec
    from speech.recognizer import IndependentRecognizer
    from speech.tts import ESPEAK_AGENT_VOICE, synthesize
    torch.manual_seed(0)
    texts = ["The square is green.", "It came from the left."]
    waves = [synthesize(t, ESPEAK_AGENT_VOICE) for t in texts]
    r = evaluate_codec(build_codec("tiny"), waves, texts, IndependentRecognizer(cpu_threads=1),
                       answers=False, dnsmos=Dnsmos(threads=1))
    asr, q = r["recognizer"]["heldout"], r["dnsmos_ovrl"]["heldout"]
    assert asr["n"] == 2 and asr["original"]["utterance_accuracy"] == 1.0
    assert asr["reconstructed"]["utterance_accuracy"] == 0.0 and asr["reconstructed"]["wer"] > 0.5
    assert 1.0 <= q["reconstructed"] < q["original"] <= 5.0, q          # measured: 2.04 < 2.27
    assert 1.0 <= q["reconstructed_whole_frames"] < q["original"], q
