"""The agent: a fusion model with the codec it was trained with, loaded once and shared by
every session (weights are read-only at run time)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "fusion.safetensors"


@dataclass
class Agent:
    model: object            # fusion.model.FusionModel
    codec: object            # speech.codec.Codec
    name: str

    @property
    def output_rate(self) -> int:
        return self.codec.sample_rate


def load_agent(path: str | Path | None = None, device: str | None = None) -> Agent:
    """Loads `path` (default: the shipped model in assets/) and its codec."""
    from fusion.checkpoint import load_with_codec
    path = Path(path) if path else DEFAULT_MODEL
    if not path.exists():
        raise FileNotFoundError(
            f"no fusion model at {path}. The shipped default lives in assets/ (see README); "
            "train one with `python run.py train fusion`, pass --model PATH, or use --random "
            "for an untrained model of the demo preset")
    model, codec = load_with_codec(path, device=device)
    return Agent(model, codec, path.stem)


def random_agent(preset_name: str = "demo", seed: int = 0, device: str | None = None) -> Agent:
    """An untrained agent (random weights) for trying the plumbing without a trained model."""
    import torch
    from fusion.checkpoint import pick_device
    from fusion.config import preset
    from fusion.model import FusionModel
    from speech.codec import build_codec
    torch.manual_seed(seed)
    codec = build_codec(preset_name if preset_name in ("tiny", "demo") else "demo")
    model = FusionModel(preset(preset_name, codec.spec)).eval()
    dev = pick_device(device)
    return Agent(model.to(dev), codec.to(dev), f"random-{preset_name}")


def add_agent_arguments(p, model_help: str = "", random_help: str = "") -> None:
    """The flags every agent-running command shares: --model, --random, --device, --mode."""
    p.add_argument("--model", default=None, metavar="PATH",
                   help=model_help or "fusion checkpoint (default: the shipped assets/fusion.safetensors)")
    p.add_argument("--random", action="store_true",
                   help=random_help or "an untrained demo-preset agent (random weights), to try the plumbing")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present)")
    p.add_argument("--mode", choices=("vanilla", "mctp"), default="mctp",
                   help="audio generation: one token per backbone step, or MCTP (default)")
