"""Train a project codec (speech/codec.py) on the agent's voice: `python run.py train codec`.

Corpus: DATA/codec/{train,eval}/*.wav (+ sentences.json with their texts), written by
`python run.py data` or by `make_codec_corpus`. Training: random crops (a share of each batch
cut from the world's answer phrases, which is what the fusion model will speak), L1
time-domain loss + multi-scale mel loss (L1 on log-mel, L2 on mel) + the RVQ commitment loss,
Adam with warm-up and cosine decay, variance-preserving weight init (`init_weights`: with
torch's default init SEANet ignores its input for thousands of steps), k-means codebook init.
Codebooks learn by EMA (EnCodec's EuclideanCodebook in training mode); EnCodec's own dead-code
expiry is switched off because the EMA update right after it overwrites the replaced entries
(they end up at embed_avg / ~0 and are never picked again); `_revive_dead_codes` replaces them
properly (entry, EMA sum and EMA count together) with vectors from the current batch.
OUT gets codec.safetensors + codec.json (`speech.codec.save_codec`), checkpoint.pt (model +
optimizer + RNGs + step, for `resume`), loss.png and report.json (`evaluate_codec` on held-out
speech, with the independent recogniser of speech/recognizer.py when it is installed).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from speech.constants import SAMPLE_RATE

CHECKPOINT = "checkpoint.pt"
LOG_MEL_FLOOR = 1e-3                 # ~35 dB under the median mel bin of the agent's speech:
                                     # keeps the loss off matching espeak's digital silence
USAGE_DECAY = 0.98                   # code usage in training: EMA over ~50 steps
HELDOUT_DIRS = ("eval", "heldout")


@dataclass(frozen=True)
class CodecTrainOptions:
    """How to train a codec; `steps` is the total (a resumed run continues up to it)."""
    preset: str = "demo"
    steps: int = 3000
    batch: int = 8
    segment_seconds: float = 0.64
    lr: float = 3e-3                     # 1.5e-3 learnt half as fast; 6e-3 collapsed
    betas: tuple[float, float] = (0.5, 0.9)   # Adam
    seed: int = 0
    w_time: float = 0.1                  # L1 on the waveform
    w_logmel: float = 1.0                # L1 on log-mel, averaged over the STFT sizes
    w_mel: float = 1.0                   # L2 on mel magnitude, averaged over the STFT sizes
    w_commit: float = 0.1                # RVQ commitment loss (summed over codebooks)
    stft_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    answer_fraction: float = 0.25        # share of each batch cut from the world's answer texts
    dead_code_ratio: float = 0.25        # revive codes used < ratio x the uniform rate
    eval_every: int = 250                # quick held-out SI-SNR / mel distance
    checkpoint_every: int = 100
    time_limit_minutes: float | None = None   # stop (and save) after this much training
    grad_clip: float = 5.0               # gradient norm clip (0: off)
    threads: int = 1                     # 2 threads on 2 busy shared cores ran ~4x slower
    device: str = "cpu"
    adversarial: bool = False
    recognize: bool = True               # final report: the independent recogniser, if installed
    asr_heldout: int = 30                # held-out sentences given to the recogniser

    def __post_init__(self):
        from speech.codec import CODEC_PRESETS
        if self.preset not in CODEC_PRESETS:
            raise ValueError(f"preset must be one of {sorted(CODEC_PRESETS)}, got {self.preset!r}")
        check_options(self, ints=(("steps", 1), ("batch", 1), ("seed", 0), ("eval_every", 1),
                                  ("checkpoint_every", 1), ("threads", 1), ("asr_heldout", 0)),
                      positive=("segment_seconds", "lr"),
                      nonneg=("w_time", "w_logmel", "w_mel", "w_commit", "dead_code_ratio",
                              "grad_clip"))
        if self.w_time + self.w_logmel + self.w_mel == 0:
            raise ValueError("at least one reconstruction loss weight (w_time, w_logmel, "
                             "w_mel) must be > 0")
        if self.adversarial:
            raise ValueError("adversarial=True: training a codec from scratch against a "
                             "discriminator is not built (it costs ~20x per step on a CPU); "
                             "train without it, then fine-tune the decoder with `python run.py "
                             "train codec --adversarial --init DIR` (lab.codec_gan)")


def check_options(o, ints=(), positive=(), nonneg=()) -> None:
    """Validate a codec-training options dataclass (this one or lab.codec_gan's GanOptions) in
    place: the named ints (name, lowest) and positive / non-negative numbers, and the fields
    both share: answer_fraction, betas, stft_sizes (lists become tuples), time limit, device."""
    cls = type(o).__name__
    for name in ("stft_sizes", "betas"):
        if isinstance(getattr(o, name), list):
            object.__setattr__(o, name, tuple(getattr(o, name)))
    for name, lo in ints:
        v = getattr(o, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{cls}.{name} must be an int >= {lo}, got {v!r}")
    for names, lo_ok, what in ((positive, False, "> 0"), (nonneg, True, ">= 0")):
        for name in names:
            v = getattr(o, name)
            if (not isinstance(v, (int, float)) or not v < math.inf
                    or not (v >= 0 if lo_ok else v > 0)):
                raise ValueError(f"{cls}.{name} must be a number {what}, got {v!r}")
    if not isinstance(o.answer_fraction, (int, float)) or not 0 <= o.answer_fraction <= 1:
        raise ValueError(f"answer_fraction must be in [0, 1], got {o.answer_fraction!r}")
    if (not isinstance(o.betas, tuple) or len(o.betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {o.betas!r}")
    if not o.stft_sizes or any(not isinstance(n, int) or n < 16 or n & (n - 1)
                               for n in o.stft_sizes):
        raise ValueError(f"stft_sizes must be powers of 2 >= 16, got {o.stft_sizes!r}")
    if o.time_limit_minutes is not None and not o.time_limit_minutes > 0:
        raise ValueError(f"time_limit_minutes must be > 0 or None, got {o.time_limit_minutes!r}")
    if not (o.device == "cpu" or str(o.device).startswith("cuda")):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {o.device!r}")


@dataclass
class CodecTrainResult:
    codec_dir: Path
    steps: int                    # total steps done (resumed ones included)
    wall_seconds: float           # this invocation's training time
    final_loss: float             # mean total loss over the last up-to-50 steps
    history: list[dict] = field(default_factory=list)   # per step: step, loss, parts
    report: dict = field(default_factory=dict)          # what report.json holds


# --- corpus ----------------------------------------------------------------------------------
def make_codec_corpus(out_dir, n: int, seed: int = 0, n_eval: int | None = None,
                      voice=None) -> Path:
    """Speak `n` training and `n_eval` (default n // 10) held-out sentences of the demo
    world's vocabulary with `voice` (default AGENT_VOICE) into OUT/train/*.wav,
    OUT/eval/*.wav and OUT/sentences.json (the layout `python run.py data` writes under
    DATA/codec/)."""
    import soundfile as sf
    from lab.data import codec_sentences
    from speech.tts import AGENT_VOICE, synthesize
    voice = AGENT_VOICE if voice is None else voice
    n_eval = max(1, n // 10) if n_eval is None else n_eval
    if not isinstance(n, int) or n < 1 or not isinstance(n_eval, int) or n_eval < 0:
        raise ValueError(f"make_codec_corpus needs n >= 1 and n_eval >= 0, got {n}, {n_eval}")
    out = Path(out_dir)
    train, evals = codec_sentences(seed, n, n_eval)
    meta = {"sample_rate": SAMPLE_RATE, "voice": voice.to_dict(), "train": [], "eval": []}
    for split, texts in (("train", train), ("eval", evals)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            file = f"{split}/{i:06d}.wav"
            sf.write(out / file, synthesize(text, voice), SAMPLE_RATE, subtype="PCM_16")
            meta[split].append({"file": file, "text": text})
    (out / "sentences.json").write_text(json.dumps(meta, indent=1))
    return out


def resolve_corpus(path) -> Path:
    """DATA (holding codec/train) or the codec corpus directory itself -> the corpus dir."""
    p = Path(path)
    for cand in (p / "codec", p):
        if (cand / "train").is_dir() and any((cand / "train").glob("*.wav")):
            return cand
    raise FileNotFoundError(f"no codec corpus at {p}: expected {p}/codec/train/*.wav; generate "
                            f"it with `python run.py data --out {p}` (or pass --make-corpus "
                            f"to `python run.py train codec`)")


def load_split(corpus: Path, split: str) -> tuple[list[np.ndarray], list[str | None]]:
    """(float32 mono 16 kHz waveforms, their texts or None) of one corpus split."""
    from speech.audio import load_audio
    texts = {}
    if (corpus / "sentences.json").is_file():
        meta = json.loads((corpus / "sentences.json").read_text())
        texts = {e["file"]: e["text"] for k in ("train", "eval", "heldout")
                 for e in meta.get(k, [])}
    files = sorted((corpus / split).glob("*.wav"))
    return ([load_audio(f, SAMPLE_RATE) for f in files],
            [texts.get(f"{split}/{f.name}") for f in files])


def corpus_voice(corpus: Path):
    """The voice a corpus was spoken with (its sentences.json; ESPEAK_AGENT_VOICE, the voice of
    every corpus from before they named it, when it says none)."""
    from speech.tts import ESPEAK_AGENT_VOICE, voice_from_dict
    meta_file = Path(corpus) / "sentences.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return voice_from_dict(meta["voice"]) if "voice" in meta else ESPEAK_AGENT_VOICE


def corpus_replies(corpus: Path) -> str:
    """The reply version whose texts a corpus speaks (its sentences.json; "v1" when it says
    none: corpora from before reply versions)."""
    from demo.replies import check_version
    meta_file = Path(corpus) / "sentences.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return check_version(meta.get("replies", "v1"))


def reply_waves(corpus: Path, waves: list[np.ndarray], texts: list[str | None]) -> list[np.ndarray]:
    """The waveforms among `waves` that speak one of the world's replies, in the corpus's
    reply version (`corpus_replies`): what `answer_fraction` of each batch is cut from."""
    from demo.replies import all_reply_texts
    replies = set(all_reply_texts(corpus_replies(corpus)))
    return [w for w, t in zip(waves, texts) if t in replies]


def random_batch(rng: np.random.Generator, waves: list[np.ndarray], batch: int,
                 length: int) -> np.ndarray:
    """(batch, length) random crops; shorter utterances are placed at a random offset in
    silence."""
    out = np.zeros((batch, length), np.float32)
    for b in range(batch):
        x = waves[rng.integers(len(waves))]
        if len(x) >= length:
            s = rng.integers(len(x) - length + 1)
            out[b] = x[s:s + length]
        else:
            s = rng.integers(length - len(x) + 1)
            out[b, s:s + len(x)] = x
    return out


def heldout_dir(corpus: Path) -> str | None:
    """The corpus's held-out split (eval/ or heldout/), or None."""
    return next((d for d in HELDOUT_DIRS if (corpus / d).is_dir()), None)


def crop_batches(corpus: Path, o, codec, rng: np.random.Generator, device):
    """(batch() -> (B, 1, T) training crops, T): `o.batch` random `o.segment_seconds` crops of
    the corpus's training split (whole codec frames), `o.answer_fraction` of them cut from
    the world's replies (`reply_waves`)."""
    import torch
    train_w, train_t = load_split(corpus, "train")
    answer_w = reply_waves(corpus, train_w, train_t)
    n_answer = round(o.batch * o.answer_fraction) if answer_w else 0
    length = max(1, round(o.segment_seconds * codec.sample_rate / codec.hop_length)) \
        * codec.hop_length

    def batch():                                                           # (B, 1, T)
        x = random_batch(rng, train_w, o.batch - n_answer, length)
        if n_answer:
            x = np.concatenate([random_batch(rng, answer_w, n_answer, length), x])
        return torch.from_numpy(x)[:, None].to(device)
    return batch, length


# --- model pieces ----------------------------------------------------------------------------
class MultiScaleMel:
    """Mel spectrograms (power 1, window-normalised) at several STFT sizes."""

    def __init__(self, sizes: tuple[int, ...], sample_rate: int, device) -> None:
        import torchaudio
        self.transforms = [torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n, hop_length=n // 4, n_mels=min(64, n // 8),
            power=1.0, normalized=True, center=False).to(device) for n in sizes]

    def losses(self, y, x):
        """(L1 on log-mel, L2 on mel), each averaged over the sizes; y, x (B, T)."""
        import torch
        l1 = l2 = 0.0
        for t in self.transforms:
            my, mx = t(y), t(x)
            l1 = l1 + (torch.log(my + LOG_MEL_FLOOR) - torch.log(mx + LOG_MEL_FLOOR)).abs().mean()
            l2 = l2 + ((my - mx) ** 2).mean()
        return l1 / len(self.transforms), l2 / len(self.transforms)


def quantize_train(quantizer, emb, dead_ratio: float):
    """EnCodec's RVQ forward in training mode (EMA codebook updates, straight-through
    gradient) with proper dead-code revival.
    emb (B, D, F) -> (quantized (B, D, F), commit loss, codes (n_q, B, F), codes revived)."""
    import torch
    out, residual, commit, codes, revived = 0.0, emb, 0.0, [], 0
    n_vectors = emb.shape[0] * emb.shape[2]
    for layer in quantizer.vq.layers:
        layer._codebook.threshold_ema_dead_code = 0   # replaced by _revive_dead_codes
        q, ind, loss = layer(residual)                # (B, D, F), EMA-updates the codebook
        revived += _revive_dead_codes(layer._codebook, residual,
                                      dead_ratio * n_vectors / layer.codebook_size)
        residual = residual - q
        out, commit = out + q, commit + loss.mean()
        codes.append(ind)
    return out, commit, torch.stack(codes), revived


def _revive_dead_codes(cb, residual, threshold: float) -> int:
    """Replace codes whose EMA count is below `threshold` with random batch vectors."""
    import torch
    dead = cb.cluster_size < threshold
    n = int(dead.sum())
    if n:
        samples = residual.detach().transpose(1, 2).reshape(-1, residual.shape[1])  # (N, D)
        new = samples[torch.randint(samples.shape[0], (n,), device=samples.device)]
        count = max(threshold, 1e-3) * 2
        cb.embed.data[dead] = new
        cb.embed_avg.data[dead] = new * count
        cb.cluster_size.data[dead] = count
    return n


def init_weights(model, gain: float = 1.0) -> None:
    """Variance-preserving initialisation of every (weight-normed) convolution: N(0,
    gain^2 / fan_in) directions, g = their norm, zero biases. With torch's default init the
    signal shrinks ~3x per layer, so a fresh SEANet's output hardly depends on its input
    (measured: 3e-7 output change between two different utterances) and training sits for
    thousands of steps on the average spectrum."""
    import torch
    for mod in model.modules():
        if not isinstance(mod, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            continue
        w = getattr(mod, "weight_v", mod.weight)
        if isinstance(mod, torch.nn.ConvTranspose1d):   # (C_in, C_out, K): K / stride taps land
            fan_in = w.shape[0] * w.shape[2] / mod.stride[0]
        else:                                            # (C_out, C_in, K)
            fan_in = w.shape[1] * w.shape[2]
        with torch.no_grad():
            w.normal_(0.0, gain / math.sqrt(fan_in))
            if hasattr(mod, "weight_g"):
                mod.weight_g.copy_(torch.norm_except_dim(w, 2, 0))
            if mod.bias is not None:
                mod.bias.zero_()


def init_codebooks(model, batches: list) -> None:
    """k-means initialisation of every codebook on the encoder's output for `batches`."""
    import torch
    from encodec.quantization.core_vq import kmeans
    with torch.no_grad():
        residual = torch.cat([model.encoder(b) for b in batches], 0)         # (B, D, F)
        for layer in model.quantizer.vq.layers:
            cb = layer._codebook
            flat = residual.transpose(1, 2).reshape(-1, residual.shape[1])     # (N, D)
            embed, sizes = kmeans(flat, cb.codebook_size, 10)
            count = flat.shape[0] / cb.codebook_size
            cb.embed.data.copy_(embed)
            cb.embed_avg.data.copy_(embed * count)
            cb.cluster_size.data.fill_(count)
            cb.inited.data.fill_(1.0)
            residual = residual - layer.decode(layer.encode(residual))


def codebook_stats(cluster_sizes: list) -> list[dict]:
    """Per codebook: fraction of codes used (count >= 0.5) and perplexity exp(entropy), from
    (counts per code) arrays."""
    out = []
    for c in cluster_sizes:
        c = np.asarray(c, np.float64)
        p = c / max(c.sum(), 1e-12)
        h = -(p[p > 0] * np.log(p[p > 0])).sum()
        out.append({"used": round(float((c >= 0.5).mean()), 4),
                    "perplexity": round(float(np.exp(h)), 2), "bins": len(c)})
    return out


# --- evaluation ------------------------------------------------------------------------------
def si_snr(ref: np.ndarray, est: np.ndarray) -> float:
    """Scale-invariant signal-to-noise ratio in dB of `est` against `ref` (both (T,))."""
    ref = ref.astype(np.float64) - ref.mean()
    est = est.astype(np.float64) - est.mean()
    s = (est @ ref) / max(ref @ ref, 1e-12) * ref
    return float(10 * np.log10(max(s @ s, 1e-12) / max((est - s) @ (est - s), 1e-12)))


def mel_distance(ref: np.ndarray, est: np.ndarray) -> float:
    """Mean |log mel(ref) - log mel(est)| (1024-point STFT, hop 256, 80 mels, magnitudes
    floored at LOG_MEL_FLOOR)."""
    import torch
    import torchaudio
    t = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=1024, hop_length=256,
                                             n_mels=80, power=1.0, normalized=True)
    a, b = t(torch.from_numpy(ref)), t(torch.from_numpy(est))
    return float((torch.log(a + LOG_MEL_FLOOR) - torch.log(b + LOG_MEL_FLOOR)).abs().mean())


def reconstruct(codec, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(decoded audio (T,), codes (n_q, F)) of one utterance through the codec."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(wave, np.float32)).to(codec.device)[None, None]
    codes = codec.encode(x)                                            # (1, n_q, F)
    y = codec.decode(codes)[0, 0, :len(wave)].float().cpu().numpy()  # (T,)
    return y, codes[0].cpu().numpy()


def decode_whole(codec, wave: np.ndarray) -> np.ndarray:
    """One utterance through the codec, every frame's samples kept (F * hop_length, F =
    ceil(T / hop_length)): what the engine emits for a reply of those codes."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(wave, np.float32)).to(codec.device)[None, None]
    return codec.decode(codec.encode(x))[0, 0].float().cpu().numpy()


def _asr_scores(recognizer, texts, waves) -> dict:
    """Utterances recognised exactly, word recall (reference words found in order) and WER."""
    from speech.recognizer import is_recognized, matched_words, word_errors
    hyps = [recognizer.transcribe(w) for w in waves]
    n_ref = sum(matched_words(t, h)[1] for t, h in zip(texts, hyps)) or 1
    return {"utterance_accuracy": round(float(np.mean([is_recognized(t, h) for t, h in
                                                        zip(texts, hyps)])), 4),
            "word_recall": round(sum(matched_words(t, h)[0] for t, h in zip(texts, hyps))
                                 / n_ref, 4),
            "wer": round(sum(word_errors(t, h)[0] for t, h in zip(texts, hyps)) / n_ref, 4),
            "hypotheses": hyps}


def evaluate_codec(codec, waves, texts, recognizer=None, answers: bool = True,
                   asr_heldout: int = 30, answer_voice=None, replies: str = "v1",
                   dnsmos=None) -> dict:
    """Reconstruction quality on held-out utterances: SI-SNR, mel distance, per-codebook
    usage/perplexity; with a recogniser, its accuracy on original vs reconstructed audio
    (the world's reply texts of version `replies` spoken by `answer_voice` (default
    AGENT_VOICE), and
    `asr_heldout` held-out sentences)."""
    recs = [reconstruct(codec, w) for w in waves]
    counts = np.zeros((codec.n_q, codec.bins))
    for _, c in recs:
        for q in range(codec.n_q):
            counts[q] += np.bincount(c[q], minlength=codec.bins)
    out = {"utterances": len(waves), "seconds": round(sum(map(len, waves)) / SAMPLE_RATE, 2),
           "si_snr_db": round(float(np.mean([si_snr(w, y) for w, (y, _) in zip(waves, recs)])), 3),
           "mel_distance": round(float(np.mean([mel_distance(w, y) for w, (y, _) in
                                                 zip(waves, recs)])), 4),
           "codebooks": codebook_stats(counts)}
    if recognizer is None:
        return out
    sets = []
    if answers:
        from demo.replies import all_reply_texts
        from speech.tts import AGENT_VOICE, synthesize
        voice = AGENT_VOICE if answer_voice is None else answer_voice
        a_texts = list(all_reply_texts(replies))
        sets.append(("answers", a_texts, [synthesize(t, voice) for t in a_texts]))
    pairs = [(t, w) for t, w in zip(texts, waves) if t][:asr_heldout]
    if pairs:
        sets.append(("heldout", [t for t, _ in pairs], [w for _, w in pairs]))
    asr, quality = {}, {}
    for name, ts, ws in sets:
        ys = [reconstruct(codec, w)[0] for w in ws]
        orig = _asr_scores(recognizer, ts, ws)
        recon = _asr_scores(recognizer, ts, ys)
        if dnsmos is not None:   # DNSMOS overall (1-5), before and after the codec; whole
            # frames: the decoder's output up to the end of the last 40 ms frame, as the engine
            # emits a reply (DNSMOS tiles a short clip: its last few ms move the score)
            whole = [decode_whole(codec, w) for w in ws]
            quality[name] = {k: round(float(np.mean([dnsmos.score(x, SAMPLE_RATE)["ovrl"] for x in xs])), 3)
                             for k, xs in (("original", ws), ("reconstructed", ys),
                                           ("reconstructed_whole_frames", whole))}
        asr[name] = {"n": len(ts), "original": {k: v for k, v in orig.items() if k != "hypotheses"},
                     "reconstructed": {k: v for k, v in recon.items() if k != "hypotheses"},
                     "errors": [{"text": t, "original": o, "reconstructed": r}
                                for t, o, r in zip(ts, orig["hypotheses"], recon["hypotheses"])
                                if o != r or not _same(t, r)]}
    out["recognizer"] = asr
    if dnsmos is not None:
        out["dnsmos_ovrl"] = quality
    return out


def _same(text: str, hyp: str) -> bool:
    from speech.recognizer import is_recognized
    return is_recognized(text, hyp)


def plot_history(history: list[dict], evals: list[dict], path: Path) -> None:
    """Loss curves (running mean) and held-out SI-SNR / mel distance vs step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.array([h["step"] for h in history])
    for key in ("loss", "time", "logmel", "mel", "commit"):
        v = np.array([h[key] for h in history])
        k = max(1, min(50, len(v) // 10))
        a.plot(steps[k - 1:], np.convolve(v, np.ones(k) / k, "valid"), label=key)
    a.set_yscale("log"), a.set_xlabel("step"), a.legend(), a.set_title("training losses")
    if evals:
        b.plot([e["step"] for e in evals], [e["si_snr_db"] for e in evals], "o-", label="SI-SNR dB")
        b2 = b.twinx()
        b2.plot([e["step"] for e in evals], [e["mel_distance"] for e in evals], "s--", color="C1",
                label="mel distance")
        b.set_xlabel("step"), b.set_title("held-out"), b.legend(loc="upper left")
        b2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- training --------------------------------------------------------------------------------
def lr_decay(o, step: int, elapsed: float) -> float:
    """Cosine decay from 1 to 0.1 over `o.steps` (or over `o.time_limit_minutes`, whichever
    runs out first)."""
    frac = step / o.steps
    if o.time_limit_minutes is not None:
        frac = max(frac, elapsed / (60 * o.time_limit_minutes))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0)))


def learning_rate(o: CodecTrainOptions, step: int, elapsed: float) -> float:
    """50-step linear warm-up, then `lr_decay`."""
    return o.lr * min(1.0, (step + 1) / 50) * lr_decay(o, step, elapsed)


def heldout_scores(codec, held_w: list[np.ndarray], step: int) -> dict:
    """The quick held-out check during training: mean SI-SNR and mel distance of the first 16
    held-out utterances through the codec."""
    pairs = [(w, reconstruct(codec, w)[0]) for w in held_w[:16]]
    return {"step": step, "si_snr_db": float(np.mean([si_snr(w, y) for w, y in pairs])),
            "mel_distance": float(np.mean([mel_distance(w, y) for w, y in pairs]))}


def train_codec(corpus_dir, out_dir="assets/codec", options: CodecTrainOptions | None = None,
                progress: bool = True, resume: bool = False) -> CodecTrainResult:
    """Train a codec on the corpus (see the module docstring) and save it to `out_dir`.
    With `resume`, continues from OUT/checkpoint.pt when there is one."""
    import torch
    from tqdm import tqdm
    from speech.codec import CODEC_PRESETS, build_codec, save_codec
    o = options or CodecTrainOptions()
    if not isinstance(o, CodecTrainOptions):
        raise TypeError(f"options must be a CodecTrainOptions, got {type(o).__name__}")
    corpus, out = resolve_corpus(corpus_dir), Path(out_dir)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(o.threads)
    try:
        device = torch.device(o.device)
        held = heldout_dir(corpus)
        held_w, held_t = load_split(corpus, held) if held else ([], [])
        torch.manual_seed(o.seed)
        rng = np.random.default_rng(o.seed)
        codec = build_codec(o.preset)
        model = codec.model.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=o.lr, betas=o.betas)
        mel = MultiScaleMel(o.stft_sizes, codec.sample_rate, device)
        batch, length = crop_batches(corpus, o, codec, rng, device)
        step, history, evals, elapsed = 0, [], [], 0.0
        usage = np.zeros((codec.n_q, codec.bins))
        ckpt = out / CHECKPOINT
        if resume and ckpt.is_file():
            state = torch.load(ckpt, map_location=device, weights_only=True)
            if state["config"] != CODEC_PRESETS[o.preset].to_dict():
                raise ValueError(f"{ckpt} was trained with codec config {state['config']}, not "
                                 f"preset {o.preset!r}; resume with that preset or start over "
                                 f"without --resume")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            rng.bit_generator.state = json.loads(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            step, history, evals = state["step"], state["history"], state["evals"]
            usage = np.asarray(state["usage"], np.float64)
            elapsed = state["elapsed"]
        else:
            if resume and progress:
                print(f"(no checkpoint at {ckpt}: training from step 0)")
            init_weights(model)
            init_codebooks(model, [batch() for _ in range(4)])
        out.mkdir(parents=True, exist_ok=True)

        def save_checkpoint():
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "rng": json.dumps(rng.bit_generator.state),
                        "torch_rng": torch.get_rng_state(), "history": history, "evals": evals,
                        "elapsed": elapsed, "usage": usage.tolist(),
                        "config": CODEC_PRESETS[o.preset].to_dict(),
                        "options": json.dumps(asdict(o))}, tmp)
            tmp.replace(ckpt)

        def quick_eval():
            model.eval()
            evals.append(heldout_scores(codec, held_w, step))
            model.train()

        model.train()
        t0, start_step, start_elapsed = time.time(), step, elapsed
        limit = None if o.time_limit_minutes is None else o.time_limit_minutes * 60
        bar = tqdm(total=o.steps, initial=step, desc="codec", disable=not progress)
        while step < o.steps and (limit is None or elapsed < limit):
            for g in opt.param_groups:
                g["lr"] = learning_rate(o, step, elapsed)
            x = batch()                                                    # (B, 1, T)
            emb = model.encoder(x)                                         # (B, D, F)
            q, commit, codes, revived = quantize_train(model.quantizer, emb, o.dead_code_ratio)
            for i in range(codec.n_q):                                     # recent code usage
                usage[i] = usage[i] * USAGE_DECAY + np.bincount(
                    codes[i].reshape(-1).cpu().numpy(), minlength=codec.bins)
            y = model.decoder(q)[..., :length]                             # (B, 1, T)
            l_time = (y - x).abs().mean()
            l_logmel, l_mel = mel.losses(y[:, 0], x[:, 0])
            loss = o.w_time * l_time + o.w_logmel * l_logmel + o.w_mel * l_mel + o.w_commit * commit
            if not torch.isfinite(loss):
                raise FloatingPointError(f"codec loss is {float(loss)} at step {step}; lower "
                                         f"the learning rate (now {o.lr}) or resume from "
                                         f"the last checkpoint")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            step += 1
            elapsed = start_elapsed + time.time() - t0
            history.append({"step": step, "loss": loss.item(), "time": l_time.item(),
                            "logmel": l_logmel.item(), "mel": l_mel.item(),
                            "commit": commit.item(), "revived": revived})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", logmel=f"{l_logmel.item():.3f}")
            if held_w and step % o.eval_every == 0:
                quick_eval()
                bar.set_postfix(loss=f"{loss.item():.3f}", si_snr=f"{evals[-1]['si_snr_db']:.2f}")
            if step % o.checkpoint_every == 0:
                save_checkpoint()
        bar.close()
        save_checkpoint()
        wall = time.time() - t0
        model.eval()
        folder = save_codec(codec, out, half=True)   # the shipped size; resume: checkpoint.pt
        if history:
            plot_history(history, evals, out / "loss.png")
        report = _final_report(codec, o, held_w, held_t, history, evals, step, elapsed,
                               step - start_step, wall, progress, usage, corpus_voice(corpus),
                               corpus_replies(corpus))
        (out / "report.json").write_text(json.dumps(report, indent=1))
        final = float(np.mean([h["loss"] for h in history[-50:]])) if history else math.nan
        return CodecTrainResult(folder, step, wall, final, history, report)
    finally:
        torch.set_num_threads(threads_before)


def _final_report(codec, o, held_w, held_t, history, evals, step, elapsed, new_steps, wall,
                  progress, usage, voice, replies: str = "v1") -> dict:
    report = run_summary(codec, o, history, evals, step, elapsed, new_steps, wall, voice, replies)
    report["codebooks_train_recent"] = codebook_stats(usage)
    report["heldout"] = heldout_report(codec, o, held_w, held_t, voice, replies, progress)
    return report


def run_summary(codec, o, history, evals, step, elapsed, new_steps, wall, voice,
                replies: str) -> dict:
    """What a codec run's report.json says about the run itself (codec, options, times,
    machine, final loss, quick held-out checks, the corpus's voice and reply version)."""
    import torch
    from .bench import cpu_name
    final = float(np.mean([h["loss"] for h in history[-50:]])) if history else math.nan
    return {"codec": codec.spec.to_dict(), "config": codec.config.to_dict(),
            "options": asdict(o), "steps": step, "train_seconds_total": round(elapsed, 1),
            "train_seconds_this_run": round(wall, 1), "steps_this_run": new_steps,
            "threads": o.threads, "device": o.device, "cpu": f"{cpu_name()} x {os.cpu_count()}",
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
            "torch": torch.__version__, "final_loss": round(final, 5), "evals": evals,
            "voice": voice.to_dict(), "replies": replies}


def heldout_report(codec, o, held_w, held_t, voice, replies: str, progress: bool) -> dict:
    """`evaluate_codec` on the held-out split, with the independent recogniser and DNSMOS when
    installed and `o.recognize` (o: CodecTrainOptions or GanOptions)."""
    if not held_w:
        return {"skipped": "the corpus has no eval/ (or heldout/) split"}
    recognizer, why = None, f"disabled ({type(o).__name__}.recognize=False)"
    try:
        if not o.recognize:
            raise ImportError(why)
        from speech.recognizer import IndependentRecognizer
        recognizer = IndependentRecognizer(cpu_threads=o.threads)
        why = None
    except (ImportError, FileNotFoundError) as e:
        why = str(e)
    dnsmos = None
    if recognizer is not None:
        try:
            from .spoken_eval import Dnsmos
            dnsmos = Dnsmos(threads=o.threads)
        except (ImportError, FileNotFoundError) as e:
            print(f"codec report without DNSMOS: {e}")
    if progress:
        print("evaluating on held-out speech" + (" (+ recogniser)" if recognizer else ""))
    t = time.time()
    out = evaluate_codec(codec, held_w, held_t, recognizer, True, o.asr_heldout,
                         answer_voice=voice, replies=replies, dnsmos=dnsmos)
    out["eval_seconds"] = round(time.time() - t, 1)
    if why:
        out["recognizer"] = {"skipped": why}
    return out
