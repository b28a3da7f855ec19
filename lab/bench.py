"""`python run.py bench`: codec streaming-decode speed, vanilla vs MCTP generation, and the
compute latency (end-of-turn decision to the first reply audio ready; the project's latency
words are in app/frames.py, TurnMetrics). Ratios are measured side by side
in one run; absolute times only mean something with the hardware, which is printed too."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from app.host import cpu_name  # noqa: F401  (re-exported: train_codec, eval)
from speech.constants import SAMPLE_RATE


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    import os
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def bench_codec(codec, device, seconds: float = 4.0, chunk_sizes=(1, 2, 5, 10, 25), repeats: int = 2):
    codec = codec.to(device)
    F = int(seconds * codec.frame_rate)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, codec.bins, (1, codec.n_q, F), generator=g).to(device)
    rows = []
    with torch.inference_mode():
        codec.decode(codes[..., :4])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            _sync(device); t = time.perf_counter()
            codec.decode(codes); _sync(device)
            best = min(best, time.perf_counter() - t)
        rows.append({"chunk_frames": "offline", "chunk_ms": None, "rtf": seconds / best})
        for n in chunk_sizes:
            dec = codec.streaming_decoder(batch=1)
            best = float("inf")
            for _ in range(repeats):
                dec.reset()
                _sync(device); t = time.perf_counter()
                for i in range(0, F, n):
                    dec.decode(codes[..., i:i + n])
                _sync(device)
                best = min(best, time.perf_counter() - t)
            rows.append({"chunk_frames": n, "chunk_ms": 1000 * n / codec.frame_rate, "rtf": seconds / best})
    return {"codec": codec.spec.name, "sample_rate": codec.sample_rate, "frame_rate": codec.frame_rate,
            "n_q": codec.n_q, "seconds": seconds, "rows": rows}


def bench_generation(model, codec, device, seconds: float = 2.0, repeats: int = 3):
    from fusion.dummy import random_features
    from fusion.generator import GenerationOptions, Generator
    with torch.inference_mode():
        prefix = model.prefix(random_features(model.config, device=device))
    out = {}
    for mode in ("vanilla", "mctp"):
        opts = GenerationOptions(mode=mode, max_text_tokens=6, min_audio_seconds=seconds,
                                 max_audio_seconds=seconds)
        gen = Generator(model, codec, opts)
        list(gen.run(prefix))  # warm-up
        walls, stats = [], None
        for _ in range(repeats):
            _sync(device)
            stats = list(gen.run(prefix))[-1].stats
            walls.append(stats.wall_seconds)
        wall = statistics.median(walls)
        out[mode] = {
            "backbone_forwards": stats.backbone_forwards,
            "backbone_forwards_per_audio_s": stats.backbone_forwards_per_audio_second,
            "audio_tokens_per_s": stats.audio_tokens / wall,
            "audio_seconds": stats.audio_seconds,
            "wall_s": wall,
            "rtf": stats.audio_seconds / wall,
        }
    v, m = out["vanilla"], out["mctp"]
    out["mctp_speedup_forwards"] = v["backbone_forwards_per_audio_s"] / m["backbone_forwards_per_audio_s"]
    out["mctp_speedup_wall"] = v["wall_s"] / m["wall_s"]
    return out


def bench_latency(model, codec, device, repeats: int = 5):
    """Compute latency: end-of-turn decision -> first reply audio chunk ready, with the scene
    already encoded as it arrived (so the question's encoding and the aggregator count)."""
    from fusion.generator import GenerationOptions, Generator, PCMChunk
    from fusion.inputs import SceneEncoder
    rng = np.random.default_rng(0)
    enc = SceneEncoder(model)
    frame = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    seconds = 6.0
    for i in range(int(seconds * 5)):            # scene: 5 fps frames + 0.2 s audio blocks
        enc.push_frame(i / 5, frame)
        enc.push_audio(rng.standard_normal(SAMPLE_RATE // 5).astype(np.float32) * 0.01)
    gen = Generator(model, codec, GenerationOptions(mode="mctp", max_text_tokens=6,
                                                    min_audio_seconds=0.5, max_audio_seconds=0.5))
    lat, parts = [], []
    for r in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        feats = enc.features(enc.now - 2.0, enc.now)
        with torch.inference_mode():
            prefix = model.prefix(feats)
        _sync(device)
        t_prefix = time.perf_counter() - t0
        for ev in gen.run(prefix, t0=t0):
            if isinstance(ev, PCMChunk):
                _sync(device)
                if r:  # first run is warm-up
                    lat.append(time.perf_counter() - t0)
                    parts.append(t_prefix)
                break
    return {"compute_latency_ms_median": 1000 * statistics.median(lat),
            "compute_latency_ms_min": 1000 * min(lat),
            "question_encode_and_aggregate_ms": 1000 * statistics.median(parts),
            "repeats": repeats}


def bench_training(model, codec, device, batch: int = 32, steps: int = 6, stages=("align", "sft", "mctp"),
                   amps: tuple[bool, ...] | None = None) -> dict:
    """Seconds per optimizer step of the fusion stages, through the training loop itself
    (lab.train_loop.train) on random features of the demo-world shapes, with bf16 autocast
    off and (where it is native) on. The first step is warm-up. `model` is left untouched."""
    import copy
    import tempfile
    from fusion.dummy import random_features
    from fusion.tokens import get_tokenizer
    from .train_fusion import FusionTrainOptions, _FusionStage, set_trainable, stage_modules
    from .train_loop import LoopOptions, train, use_amp
    from .trainset import pad_replies, reply_tokens
    assert steps >= 3, steps
    m = copy.deepcopy(model).float().to(device)
    tok = get_tokenizer(m.config.tokenizer)
    g = torch.Generator().manual_seed(0)
    # a cached turn is ~90 question frames, ~285 scene-audio frames and ~29 video frames; answers
    # are ~1.2 s of speech
    feats = random_features(m.config, batch=batch, question_frames=90, audio_frames=285, n_frames=29,
                            device=device)
    F = max(1, int(1.2 * codec.frame_rate))

    def replies(with_audio):
        seqs = [reply_tokens(m.layout, tok, "a red circle",
                             torch.randint(0, codec.bins, (codec.n_q, F), generator=g) if with_audio else None)
                for _ in range(batch)]
        r, n = pad_replies(seqs)
        return r.to(device), n.to(device)

    amps = amps if amps is not None else tuple(sorted({False, use_amp(device, "auto")}))
    rows = []
    for stage in stages:
        params = set_trainable(m, stage_modules(m, stage))
        reply, lens = replies(stage != "align")
        wrapper = _FusionStage(m, mctp_only=stage == "mctp")
        for amp in amps:
            with tempfile.TemporaryDirectory() as d:
                hist = train(f"bench-{stage}", wrapper, params, lambda mod, step: mod(feats, reply, lens),
                             LoopOptions(steps, warmup=1, log_every=steps, ckpt_every=0, amp=amp),
                             Path(d), resume=False, progress=False)
            t = [h["elapsed_s"] for h in hist]  # each record follows a host sync (float(loss))
            per = (t[-1] - t[0]) / (len(t) - 1)
            rows.append({"stage": stage, "batch": batch, "amp": amp, "s_per_step": per, "examples_per_s": batch / per})
    defaults = FusionTrainOptions()
    auto = use_amp(device, "auto")
    per = {r["stage"]: r["s_per_step"] for r in rows if r["amp"] == auto}
    recipe = {"align": defaults.align_steps, "sft": defaults.sft_steps, "mctp": defaults.mctp_steps}
    est = sum(per[s] * n for s, n in recipe.items()) if set(per) == set(recipe) else None
    return {"rows": rows, "amp_auto": auto, "recipe_steps": recipe, "recipe_minutes": None if est is None else est / 60}


def bench_question_encoders(device, seconds=(2.0, 4.0), repeats: int = 5) -> dict:
    """Turn-end cost of encoding a question (log-mel + audio encoder, best of `repeats`) with the
    demo preset's from-scratch encoder and Whisper tiny.en's (demo-whisper: + its adapter block),
    at the current torch thread count."""
    from dataclasses import replace
    from speech.pretrained_audio import build_audio_encoder
    from speech.whisper_encoder import AudioEncoderConfig, log_mel
    tiny_en = AudioEncoderConfig.preset("tiny.en")
    encoders = {"demo (3 x 192)": AudioEncoderConfig.preset("demo"),
                "tiny.en (4 x 384)": replace(tiny_en, adapter_layers=0),
                "tiny.en + adapter (demo-whisper)": tiny_en}
    rng = np.random.default_rng(0)
    rows = []
    for name, cfg in encoders.items():
        enc = build_audio_encoder(cfg).eval().to(device)
        for s in seconds:
            pcm = (0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32)
            best_mel = best_enc = float("inf")
            with torch.inference_mode():
                for _ in range(repeats + 1):          # the first is a warm-up
                    t0 = time.perf_counter()
                    mel = log_mel(pcm, cfg.n_mels).to(device)[None]
                    _sync(device); t1 = time.perf_counter()
                    enc(mel); _sync(device)
                    t2 = time.perf_counter()
                    best_mel, best_enc = min(best_mel, t1 - t0), min(best_enc, t2 - t1)
            rows.append({"encoder": name, "seconds": s, "mel_ms": 1000 * best_mel,
                         "encoder_ms": 1000 * best_enc})
    return {"threads": torch.get_num_threads(), "repeats": repeats, "rows": rows}


def run_bench(model_path: str | None = None, device: str | None = None, json_path: str | None = None,
              quick: bool = False, train: bool = True) -> dict:
    from speech.codec import build_codec, CODEC_PRESETS
    from fusion.checkpoint import pick_device
    from fusion.config import preset
    from fusion.model import FusionModel
    dev = pick_device(device)
    torch.manual_seed(0)
    report = {"hardware": hardware(dev), "device": str(dev), "torch": torch.__version__}
    if model_path:
        from fusion.checkpoint import load_with_codec
        model, codec = load_with_codec(model_path, device=str(dev))
        label = str(model_path)
    else:
        codec = build_codec(CODEC_PRESETS["demo"])
        model = FusionModel(preset("demo", codec.spec)).eval()
        label = "demo preset, random weights"
    model.to(dev)
    codec = codec.to(dev)
    report["model"] = label
    report["params_m"] = model.num_params() / 1e6
    report["codec"] = [bench_codec(codec, dev, seconds=2.0 if quick else 4.0)]
    if not quick:
        from encodec import EncodecModel
        from speech.codec import Codec, quiet_weight_norm
        with quiet_weight_norm():
            c24 = Codec(EncodecModel.encodec_model_24khz(pretrained=False), n_q=8,
                        name="encodec_24khz (random weights)")
        report["codec"].append(bench_codec(c24, dev, seconds=4.0))
    report["generation"] = bench_generation(model, codec, dev, seconds=1.0 if quick else 2.0)
    report["latency"] = bench_latency(model, codec, dev, repeats=2 if quick else 5)
    report["question_encoders"] = bench_question_encoders(dev, repeats=2 if quick else 5)
    if train:
        report["training"] = bench_training(model, codec, dev, steps=3 if quick else 6,
                                            stages=("align",) if quick else ("align", "sft", "mctp"))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def format_report(r: dict) -> str:
    lines = [f"Tandem bench — {r['hardware']} — torch {r['torch']}",
             f"model: {r['model']} ({r['params_m']:.1f} M params)", ""]
    for c in r["codec"]:
        lines.append(f"codec streaming decode: {c['codec']} ({c['sample_rate']} Hz, {c['frame_rate']:.0f} frames/s, "
                     f"{c['n_q']} codebooks), real-time factor = audio s / wall s")
        lines.append(f"  {'chunk':>10} {'chunk ms':>9} {'RTF':>8}")
        for row in c["rows"]:
            ms = "" if row["chunk_ms"] is None else f"{row['chunk_ms']:.0f}"
            lines.append(f"  {str(row['chunk_frames']):>10} {ms:>9} {row['rtf']:>8.1f}")
        lines.append("")
    g = r["generation"]
    lines.append("generation, same model and prefix, vanilla vs MCTP:")
    lines.append(f"  {'mode':>8} {'fwd/audio s':>12} {'audio tok/s':>12} {'wall s':>8} {'RTF':>6}")
    for mode in ("vanilla", "mctp"):
        m = g[mode]
        lines.append(f"  {mode:>8} {m['backbone_forwards_per_audio_s']:>12.1f} {m['audio_tokens_per_s']:>12.0f} "
                     f"{m['wall_s']:>8.3f} {m['rtf']:>6.2f}")
    lines.append(f"  MCTP speedup: {g['mctp_speedup_forwards']:.2f}x fewer backbone forwards per audio second, "
                 f"{g['mctp_speedup_wall']:.2f}x wall clock")
    lat = r["latency"]
    lines.append("")
    med = lat.get("compute_latency_ms_median", lat.get("first_pcm_ms_median"))  # older JSON
    low = lat.get("compute_latency_ms_min", lat.get("first_pcm_ms_min"))
    lines.append(f"compute latency (end-of-turn decision -> first reply audio ready): median "
                 f"{med:.0f} ms (min {low:.0f} ms; of it question encode + aggregator "
                 f"{lat['question_encode_and_aggregate_ms']:.0f} ms)")
    lines.append("  response latency (end of the user's speech -> first reply sound heard) adds the "
                 "end-of-turn wait (and, in a browser, transport and playback): see `run.py replay`")
    if "question_encoders" in r:
        q = r["question_encoders"]
        lines.append("")
        lines.append(f"question encoding at the turn end ({q['threads']} threads, best of {q['repeats']}):")
        lines.append(f"  {'encoder':>32} {'question s':>10} {'log-mel ms':>10} {'encoder ms':>10}")
        for row in q["rows"]:
            lines.append(f"  {row['encoder']:>32} {row['seconds']:>10.1f} {row['mel_ms']:>10.1f} "
                         f"{row['encoder_ms']:>10.1f}")
    if "training" in r:
        t = r["training"]
        lines.append("")
        lines.append("fusion training step (the training loop on random features of the demo shapes):")
        lines.append(f"  {'stage':>6} {'batch':>6} {'bf16':>5} {'s/step':>8} {'examples/s':>11}")
        for row in t["rows"]:
            lines.append(f"  {row['stage']:>6} {row['batch']:>6} {'on' if row['amp'] else 'off':>5} "
                         f"{row['s_per_step']:>8.3f} {row['examples_per_s']:>11.1f}")
        if t["recipe_minutes"] is not None:
            steps = ", ".join(f"{k} {v}" for k, v in t["recipe_steps"].items())
            lines.append(f"  default recipe ({steps} steps, bf16 {'on' if t['amp_auto'] else 'off'}): "
                         f"~{t['recipe_minutes']:.1f} min of fusion-stage steps")
    return "\n".join(lines)
