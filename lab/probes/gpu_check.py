"""One-shot check of the CUDA paths on a machine with a GPU (CI has none):

  1. the shipped model gives the same prefix and greedy replies on CUDA as on the CPU;
  2. the fusion training loop (align / SFT / MCTP, bf16 autocast on and off) runs on CUDA,
     at the recipe's batch and at larger ones, and how fast;
  3. `run.py bench` on CUDA and on the same machine's CPU, side by side.

    python -m lab.probes.gpu_check --out DIR

Writes DIR/gpu_check.json (and prints a summary). Needs the runtime packages only.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def agreement(path: str, draws: int, device: str) -> dict:
    from fusion.checkpoint import load_with_codec
    from fusion.dummy import random_features
    from fusion.generator import GenerationOptions, Generator
    models = {d: load_with_codec(path, device=d) for d in ("cpu", device)}
    out = {"draws": draws, "prefix_max_abs_diff": 0.0, "text_equal": {}, "audio_token_agreement": {}}
    for mode in ("vanilla", "mctp"):
        same_text, agree = 0, []
        for s in range(draws):
            res = {}
            for d, (model, codec) in models.items():
                f = random_features(model.config, seed=s, device=d)
                with torch.inference_mode():
                    prefix = model.prefix(f)
                res[d] = (prefix.embeds.float().cpu(), list(Generator(model, codec, GenerationOptions(
                    mode=mode, max_audio_seconds=2.0)).run(prefix))[-1])
            out["prefix_max_abs_diff"] = max(out["prefix_max_abs_diff"],
                                             float((res["cpu"][0] - res[device][0]).abs().max()))
            a, b = res["cpu"][1], res[device][1]
            same_text += a.text_tokens == b.text_tokens
            n = min(a.codes.shape[-1], b.codes.shape[-1])
            if n:
                agree.append(float((a.codes[:, :n].cpu() == b.codes[:, :n].cpu()).float().mean()))
        out["text_equal"][mode] = same_text / draws
        out["audio_token_agreement"][mode] = sum(agree) / max(1, len(agree))
    return out


def training(path: str, batches: list[int], device: str) -> list[dict]:
    from lab.bench import bench_training
    from fusion.checkpoint import load_with_codec
    model, codec = load_with_codec(path, device=device)
    rows = []
    for b in batches:
        rows += bench_training(model, codec, torch.device(device), batch=b, steps=8, amps=(False, True))["rows"]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="assets/fusion.safetensors")
    p.add_argument("--out", default="out/gpu_check")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--device", default="cuda", help="the device checked against the CPU (cpu: dry run)")
    p.add_argument("--no-cpu-bench", action="store_true")
    p.add_argument("--batches", default="32,128,512")
    a = p.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (--device cpu for a dry run)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from lab.bench import format_report, run_bench
    report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}

    def step(name, fn):
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:  # keep going: one broken path must not hide the others
            import traceback
            report[name] = {"error": repr(e), "traceback": traceback.format_exc()}
        print(f"== {name} ({time.perf_counter() - t:.0f} s)\n{json.dumps(report[name], indent=1)[:3000]}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    step("agreement", lambda: agreement(a.model, a.draws, a.device))
    step("training", lambda: training(a.model, [int(b) for b in a.batches.split(",")], a.device))
    for dev in [a.device] + ([] if a.no_cpu_bench else ["cpu"]):
        step(f"bench_{dev}", lambda: run_bench(a.model, device=dev))
        if "error" not in report[f"bench_{dev}"]:
            print(format_report(report[f"bench_{dev}"]), flush=True)


if __name__ == "__main__":
    main()
