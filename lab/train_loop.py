"""The training loop every stage uses: AdamW with warm-up + cosine decay, gradient clipping,
DDP when launched by torchrun (gloo on CPU, NCCL on GPU), resumable checkpoints, a progress
bar, and loss curves saved as JSON + PNG."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm


@dataclass(frozen=True)
class LoopOptions:
    steps: int
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.01
    clip: float = 1.0
    log_every: int = 10
    ckpt_every: int = 100    # steps between resumable checkpoints (and at the end); 0: none
    amp: bool = False        # bf16 autocast (CUDA; CPUs with AMX / AVX512-BF16)

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.warmup < 0 or self.ckpt_every < 0:
            raise ValueError(f"LoopOptions: steps >= 0, lr > 0, warmup >= 0, ckpt_every >= 0 needed, got {self}")


AMP_CHOICES = ("auto", "on", "off")


def use_amp(device: torch.device, amp: str) -> bool:
    """bf16 autocast for training? "auto": where bf16 matmuls are native (CUDA with bf16, CPUs
    with AMX or AVX512-BF16; elsewhere CPU bf16 is emulated and slower than fp32)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp != "auto":
        return amp == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    native = [getattr(torch.cpu, f, None) for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return device.type == "cpu" and any(f is not None and f() for f in native)


# --- distributed ------------------------------------------------------------------------------
def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun, joins the process group (NCCL for CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


# --- the loop ----------------------------------------------------------------------------------
def train(name: str, module: torch.nn.Module, params: list[torch.nn.Parameter],
          loss_fn: Callable[[torch.nn.Module, int], dict[str, torch.Tensor]], opts: LoopOptions,
          run_dir: Path, resume: bool = True, progress: bool = True) -> list[dict]:
    """Runs `opts.steps` steps of `loss_fn(model, step) -> {"loss": total, ...parts}` over the
    trainable `params` of `module`. Checkpoints to run_dir/NAME.state.pt; resumes from it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / f"{name}.state.pt"
    model = module
    if dist.is_initialized():
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev = next(module.parameters()).device
        model = DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                    find_unused_parameters=True)
    # fused: one kernel over all parameters; the 13 M-row text embedding made the step 20% of
    # an align step on CPU (0.15 s of 0.75 s at batch 16, 1 thread) and 0.03 s fused
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.98),
                              fused=True)
    history: list[dict] = []
    start = 0
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        module.load_state_dict(st["model"])
        optim.load_state_dict(st["optim"])
        start, history = st["step"], st["history"]
        if is_main():
            print(f"[{name}] resuming at step {start}/{opts.steps}")

    def lr_at(step):
        if step < opts.warmup:
            return opts.lr * (step + 1) / opts.warmup
        p = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
        return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))

    dev_type = params[0].device.type if params else "cpu"
    bar = tqdm(range(start, opts.steps), desc=name, unit="step", disable=not (progress and is_main()),
               initial=start, total=opts.steps)
    t0 = time.perf_counter()
    model.train()
    for step in bar:
        for g in optim.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=opts.amp):
            parts = loss_fn(model, step)
        optim.zero_grad(set_to_none=True)
        parts["loss"].backward()
        gn = torch.nn.utils.clip_grad_norm_(params, opts.clip)
        optim.step()
        rec = {"step": step + 1, "lr": lr_at(step), "grad_norm": float(gn),
               **{k: float(v.detach()) for k, v in parts.items()}, "elapsed_s": time.perf_counter() - t0}
        history.append(rec)
        if (step + 1) % opts.log_every == 0 or step + 1 == opts.steps:
            bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k not in ("step", "lr", "elapsed_s")})
        if is_main() and opts.ckpt_every and ((step + 1) % opts.ckpt_every == 0 or step + 1 == opts.steps):
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": module.state_dict(), "optim": optim.state_dict(), "step": step + 1,
                        "history": history}, tmp)
            tmp.replace(state_path)
    bar.close()
    model.eval()
    if is_main():
        save_curves(run_dir, name, history)
    barrier()
    return history


def save_curves(run_dir: Path, name: str, history: list[dict]) -> None:
    (run_dir / f"{name}.history.json").write_text(json.dumps(history))
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in history[-1] if k not in ("step", "lr", "grad_norm", "elapsed_s")]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    for k in keys:
        ys = [h.get(k, float("nan")) for h in history]
        w = max(1, len(ys) // 50)  # light smoothing for readability
        sm = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot(steps, sm, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"Tandem training — {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / f"{name}.loss.png", dpi=100)
    plt.close(fig)
