"""Adversarial fine-tuning of a trained codec's decoder: `python run.py train codec --adversarial
--init DIR`.

The encoder and the codebooks are frozen, so every code keeps its meaning: a fusion model trained
on DIR's codes speaks through the new decoder unchanged (`fusion.checkpoint.rebind_codec` moves
it over after checking that the two codecs make the same codes). The decoder learns against
EnCodec's multi-scale STFT discriminator (`encodec.msstftd`, filters 32, STFTs of 1024/2048/512)
with EnCodec's generator loss: hinge adversarial loss + relative feature matching, plus the
reconstruction losses of `lab.train_codec` (Défossez et al. 2022, "High Fidelity Neural Audio
Compression", section 3.4: lambda_t 0.1, lambda_f 1, lambda_g 3, lambda_feat 3). The
discriminator trains alone for `disc_warmup` steps first (a random discriminator's gradient
would only add noise to a converged decoder). OUT gets codec.safetensors + codec.json,
checkpoint.pt (decoder + discriminator + optimisers, for `resume`), loss.png and report.json
(the same held-out report as `train codec`, DNSMOS included when speechmos is installed).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .train_codec import (CHECKPOINT, MultiScaleMel, check_options, corpus_replies, corpus_voice,
                          crop_batches, heldout_dir, heldout_report, heldout_scores, load_split,
                          lr_decay, resolve_corpus, run_summary)


@dataclass(frozen=True)
class GanOptions:
    """How to fine-tune a codec's decoder adversarially; `steps` is the total (resume included)."""
    steps: int = 4000
    batch: int = 8
    segment_seconds: float = 0.64
    lr: float = 1e-4                     # decoder (it starts converged: a tenth of train_codec's)
    disc_lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.9)
    seed: int = 0
    w_time: float = 0.1                  # EnCodec's lambda_t
    w_logmel: float = 1.0                # lambda_f, split as in train_codec
    w_mel: float = 1.0
    w_adv: float = 3.0                   # lambda_g: hinge loss of the generator
    w_feat: float = 3.0                  # lambda_feat: relative L1 on discriminator features
    disc_filters: int = 16               # EnCodec: 32 (2.2x the step time on 2 CPU cores)
    disc_warmup: int = 200               # discriminator-only steps before the decoder sees it
    stft_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    answer_fraction: float = 0.25
    eval_every: int = 250
    checkpoint_every: int = 100
    time_limit_minutes: float | None = None
    grad_clip: float = 5.0
    threads: int = 1
    device: str = "cpu"
    recognize: bool = True
    asr_heldout: int = 30

    def __post_init__(self):
        check_options(self, ints=(("steps", 1), ("batch", 1), ("seed", 0), ("disc_filters", 1),
                                  ("disc_warmup", 0), ("eval_every", 1), ("checkpoint_every", 1),
                                  ("threads", 1), ("asr_heldout", 0)),
                      positive=("segment_seconds", "lr", "disc_lr"),
                      nonneg=("w_time", "w_logmel", "w_mel", "w_adv", "w_feat", "grad_clip"))
        if self.w_adv + self.w_feat == 0:
            raise ValueError("w_adv and w_feat are both 0: nothing adversarial is left; train "
                             "without --adversarial instead")


@dataclass
class GanResult:
    codec_dir: Path
    steps: int
    wall_seconds: float
    history: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def discriminator(filters: int):
    """EnCodec's MS-STFT discriminator (the `encodec` package's own module)."""
    from encodec.msstftd import MultiScaleSTFTDiscriminator
    return MultiScaleSTFTDiscriminator(filters=filters)


def discriminator_loss(real_logits, fake_logits):
    """Hinge loss, averaged over the scales: mean relu(1 - D(x)) + mean relu(1 + D(G(z)))."""
    import torch.nn.functional as F
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean()
               for r, f in zip(real_logits, fake_logits)) / len(real_logits)


def generator_losses(fake_logits, real_fmaps, fake_fmaps):
    """(hinge adversarial loss, relative feature-matching loss), each averaged over scales and
    layers: mean relu(1 - D(G(z))); |D_l(x) - D_l(G(z))|_1 / mean |D_l(x)|."""
    import torch.nn.functional as F
    adv = sum(F.relu(1 - f).mean() for f in fake_logits) / len(fake_logits)
    feat, n = 0.0, 0
    for rs, fs in zip(real_fmaps, fake_fmaps):
        for r, f in zip(rs, fs):
            r = r.detach()
            feat = feat + (r - f).abs().mean() / r.abs().mean().clamp_min(1e-8)
            n += 1
    return adv, feat / max(n, 1)


def finetune_decoder(init_dir, corpus_dir, out_dir, options: GanOptions | None = None,
                     progress: bool = True, resume: bool = False) -> GanResult:
    """Fine-tune the decoder of the codec in `init_dir` (see the module docstring) and save the
    codec to `out_dir`; with `resume`, continue from OUT/checkpoint.pt."""
    import torch
    from tqdm import tqdm
    from speech.codec import code_weights, load_codec, save_codec
    o = options or GanOptions()
    if not isinstance(o, GanOptions):
        raise TypeError(f"options must be a GanOptions, got {type(o).__name__}")
    corpus, out = resolve_corpus(corpus_dir), Path(out_dir)
    if out.resolve() == Path(init_dir).resolve():
        raise ValueError(f"--out {out} is the codec being fine-tuned: write the new codec to "
                         f"another directory (the fusion model trained on {init_dir} is rebound "
                         f"to it with --model)")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(o.threads)
    try:
        device = torch.device(o.device)
        codec = load_codec(init_dir, device=device)
        if codec.config is None:
            raise ValueError(f"{init_dir} is not a project codec: only a codec trained by "
                             f"`python run.py train codec` can be fine-tuned")
        frozen = {k: v.clone() for k, v in code_weights(codec.model).items()}
        model = codec.model
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.decoder.parameters():
            p.requires_grad_(True)
        model.eval()                                    # frozen quantizer: no EMA updates
        torch.manual_seed(o.seed)
        rng = np.random.default_rng(o.seed)
        disc = discriminator(o.disc_filters).to(device)
        opt_g = torch.optim.Adam(model.decoder.parameters(), lr=o.lr, betas=o.betas)
        opt_d = torch.optim.Adam(disc.parameters(), lr=o.disc_lr, betas=o.betas)
        mel = MultiScaleMel(o.stft_sizes, codec.sample_rate, device)
        held = heldout_dir(corpus)
        held_w, held_t = load_split(corpus, held) if held else ([], [])
        batch, length = crop_batches(corpus, o, codec, rng, device)

        step, history, evals, elapsed = 0, [], [], 0.0
        ckpt = out / CHECKPOINT
        if resume and ckpt.is_file():
            state = torch.load(ckpt, map_location=device, weights_only=True)
            model.decoder.load_state_dict(state["decoder"])
            disc.load_state_dict(state["discriminator"])
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
            rng.bit_generator.state = json.loads(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            step, history, evals, elapsed = (state["step"], state["history"], state["evals"],
                                             state["elapsed"])
        out.mkdir(parents=True, exist_ok=True)

        def save_checkpoint():
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"step": step, "decoder": model.decoder.state_dict(),
                        "discriminator": disc.state_dict(), "opt_g": opt_g.state_dict(),
                        "opt_d": opt_d.state_dict(), "rng": json.dumps(rng.bit_generator.state),
                        "torch_rng": torch.get_rng_state(), "history": history, "evals": evals,
                        "elapsed": elapsed, "options": json.dumps(asdict(o))}, tmp)
            tmp.replace(ckpt)

        if held_w and not evals:                      # step 0: the codec as it came
            evals.append(heldout_scores(codec, held_w, step))
        model.decoder.train()
        t0, start_step, start_elapsed = time.time(), step, elapsed
        limit = None if o.time_limit_minutes is None else o.time_limit_minutes * 60
        bar = tqdm(total=o.steps, initial=step, desc="decoder GAN", disable=not progress)
        while step < o.steps and (limit is None or elapsed < limit):
            for opt, lr in ((opt_g, o.lr), (opt_d, o.disc_lr)):
                for g in opt.param_groups:
                    g["lr"] = lr * lr_decay(o, step, elapsed)
            x = batch()
            with torch.no_grad():                                           # frozen tokens
                codes = model.quantizer.vq.encode(model.encoder(x), n_q=codec.n_q)  # (n_q, B, F)
                q = model.quantizer.decode(codes)                            # (B, D, F)
            y = model.decoder(q)[..., :length]                               # (B, 1, T)
            real_logits, _ = disc(x)
            fake_logits, _ = disc(y.detach())
            l_d = discriminator_loss(real_logits, fake_logits)
            opt_d.zero_grad(set_to_none=True)
            l_d.backward()
            opt_d.step()
            l_time = (y - x).abs().mean()
            l_logmel, l_mel = mel.losses(y[:, 0], x[:, 0])
            loss = o.w_time * l_time + o.w_logmel * l_logmel + o.w_mel * l_mel
            l_adv = l_feat = torch.zeros(())
            if step >= o.disc_warmup:
                fake_logits, fake_fmaps = disc(y)
                with torch.no_grad():
                    _, real_fmaps = disc(x)
                l_adv, l_feat = generator_losses(fake_logits, real_fmaps, fake_fmaps)
                loss = loss + o.w_adv * l_adv + o.w_feat * l_feat
            if not torch.isfinite(loss):
                raise FloatingPointError(f"decoder loss is {float(loss)} at step {step}; lower "
                                         f"--lr (now {o.lr}) or resume from the last checkpoint")
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), o.grad_clip)
            opt_g.step()
            disc.zero_grad(set_to_none=True)            # the decoder's pass left grads in disc
            step += 1
            elapsed = start_elapsed + time.time() - t0
            history.append({"step": step, "loss": loss.item(), "time": l_time.item(),
                            "logmel": l_logmel.item(), "mel": l_mel.item(), "adv": l_adv.item(),
                            "feat": l_feat.item(), "disc": l_d.item()})
            bar.update(1)
            bar.set_postfix(logmel=f"{l_logmel.item():.3f}", adv=f"{l_adv.item():.2f}",
                            disc=f"{l_d.item():.2f}")
            if held_w and step % o.eval_every == 0:
                model.decoder.eval()
                evals.append(heldout_scores(codec, held_w, step))
                model.decoder.train()
            if step % o.checkpoint_every == 0:
                save_checkpoint()
        bar.close()
        save_checkpoint()
        wall = time.time() - t0
        model.decoder.eval()
        for k, v in code_weights(codec.model).items():  # the codes must not have moved
            if not torch.equal(v, frozen[k]):
                raise RuntimeError(f"codec weight {k} changed during decoder fine-tuning")
        codec.name = f"{codec.name}-gan"
        folder = save_codec(codec, out, half=True)
        if history:
            plot_history(history, evals, out / "loss.png")
        report = _report(codec, o, init_dir, held_w, held_t, history, evals, step, elapsed,
                         step - start_step, wall, progress, corpus)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return GanResult(folder, step, wall, history, report)
    finally:
        torch.set_num_threads(threads_before)


def plot_history(history: list[dict], evals: list[dict], path: Path) -> None:
    """Reconstruction and adversarial losses (running means) and held-out mel distance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.array([h["step"] for h in history])
    for key in ("logmel", "adv", "feat", "disc"):
        v = np.array([h[key] for h in history])
        k = max(1, min(50, len(v) // 10))
        a.plot(steps[k - 1:], np.convolve(v, np.ones(k) / k, "valid"), label=key)
    a.set_xlabel("step"), a.legend(), a.set_title("decoder GAN losses")
    if evals:
        b.plot([e["step"] for e in evals], [e["mel_distance"] for e in evals], "s-",
               label="held-out mel distance")
        b.set_xlabel("step"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _report(codec, o, init_dir, held_w, held_t, history, evals, step, elapsed, new_steps, wall,
            progress, corpus) -> dict:
    voice, replies = corpus_voice(corpus), corpus_replies(corpus)
    report = run_summary(codec, o, history, evals, step, elapsed, new_steps, wall, voice, replies)
    report["adversarial"] = {"init": str(init_dir), "steps": step,
                             "final": {k: round(float(np.mean([h[k] for h in history[-50:]])), 4)
                                       for k in ("logmel", "adv", "feat", "disc")}
                             if history else {}}
    report["heldout"] = heldout_report(codec, o, held_w, held_t, voice, replies, progress)
    return report
