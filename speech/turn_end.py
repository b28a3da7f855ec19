"""End-of-turn prediction: is the user's question complete, from the audio heard so far?

Asked at a short VAD pause (`TURN_END_PAUSE`, 0.2 s of silence, as Pipecat's Smart Turn
does), long before the engine's fixed `END_OF_TURN_SILENCE`: a high probability lets the
agent answer early; a low one (the user paused inside the question, "What color is ...")
tells it to keep listening. A small model of its own, separate from the fusion model:

    pcm (T,) 16 kHz -> last window_seconds (zeros before the stream started)
      -> Whisper log-mel (n_mels, F), F = 100 frames / s
      -> n_conv x [Conv1d k3 stride 2 + GELU]  (channels, F / 2**n_conv)
      -> GRU (hidden) -> last state -> Linear -> sigmoid: P(question complete)

Saved as one safetensors file with the config in its metadata (`TurnEndPredictor.save`);
trained in the demo world by `python -m lab.train_turn_end`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from speech.audio import check_pcm
from speech.constants import HOP_LENGTH, N_FFT, SAMPLE_RATE

FORMAT = "tandem-turn-end"


@dataclass(frozen=True)
class TurnEndConfig:
    window_seconds: float = 2.5    # audio heard before the decision that the model sees
    n_mels: int = 80               # Whisper's filters exist for 80 and 128
    channels: int = 64
    n_conv: int = 2                # stride-2 convolutions: 100 -> 25 frames / s
    hidden: int = 64               # GRU state

    def __post_init__(self):
        if not 0.5 <= self.window_seconds <= 10.0:
            raise ValueError(f"TurnEndConfig.window_seconds must be in [0.5, 10] s, got "
                             f"{self.window_seconds}")
        if self.n_mels not in (80, 128):
            raise ValueError(f"TurnEndConfig.n_mels must be 80 or 128 (Whisper's mel "
                             f"filters), got {self.n_mels}")
        for name in ("channels", "n_conv", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TurnEndConfig.{name} must be an integer >= 1, got {v!r}")

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * SAMPLE_RATE))

    @property
    def n_frames(self) -> int:
        """Mel frames of one window (Whisper's convention: T // HOP_LENGTH)."""
        return self.window_samples // HOP_LENGTH

    @classmethod
    def from_dict(cls, d: dict) -> "TurnEndConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"TurnEndConfig has no fields {sorted(unknown)}; the file was "
                             f"written by another version of speech/turn_end.py")
        return cls(**{**d, "window_seconds": float(d.get("window_seconds", 2.5))})


class TurnEndNet(nn.Module):
    """log-mel (B, n_mels, F) -> logit (B,) of "the question is complete"."""

    def __init__(self, config: TurnEndConfig):
        super().__init__()
        self.config = c = config
        convs, width = [], c.n_mels
        for _ in range(c.n_conv):
            convs += [nn.Conv1d(width, c.channels, 3, stride=2, padding=1), nn.GELU()]
            width = c.channels
        self.convs = nn.Sequential(*convs)
        self.gru = nn.GRU(c.channels, c.hidden, batch_first=True)
        self.head = nn.Linear(c.hidden, 1)

    def forward(self, mel: Tensor) -> Tensor:
        x = self.convs(mel)                                   # (B, C, F')
        _, h = self.gru(x.transpose(1, 2))                    # h: (1, B, hidden)
        return self.head(h[0]).squeeze(-1)                    # (B,)


def window(pcm, config: TurnEndConfig) -> np.ndarray:
    """The last `window_seconds` of 16 kHz float audio, zeros in front when there is less:
    float32 (window_samples,). Raises ValueError saying what to do for bad audio."""
    check_pcm(pcm, SAMPLE_RATE, SAMPLE_RATE, "turn-end audio")
    x = pcm.detach().cpu().numpy() if torch.is_tensor(pcm) else np.asarray(pcm)
    if len(x) <= N_FFT // 2:
        raise ValueError(f"turn-end audio: {len(x)} samples is too little to judge; pass "
                         f"the stream's last {config.window_seconds} s (at least "
                         f"{N_FFT // 2 + 1} samples)")
    n = config.window_samples
    x = x[-n:].astype(np.float32, copy=False)
    return np.concatenate([np.zeros(n - len(x), np.float32), x]) if len(x) < n else x


def features(windows: np.ndarray, config: TurnEndConfig) -> Tensor:
    """(B, window_samples) float audio -> (B, n_mels, n_frames) Whisper log-mel
    (`speech.whisper_encoder.log_mel`), each window normalised on its own."""
    from speech.whisper_encoder import log_mel
    x = np.asarray(windows, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != config.window_samples:
        raise ValueError(f"features takes (B, {config.window_samples}) windows, got "
                         f"{tuple(x.shape)}; cut them with speech.turn_end.window")
    return torch.stack([log_mel(w, config.n_mels) for w in x])


class TurnEndPredictor:
    """P(the user's question is complete | the audio so far), for the engine's short pauses."""

    def __init__(self, net: TurnEndNet):
        self.net = net.eval()
        self.config = net.config

    @classmethod
    def new(cls, config: TurnEndConfig = TurnEndConfig(), seed: int = 0) -> "TurnEndPredictor":
        """Untrained (random weights from `seed`)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(TurnEndNet(config))

    @torch.inference_mode()
    def probability(self, pcm16k_tail) -> float:
        """P(complete) from the stream's audio up to now (float (T,) in [-1, 1], 16 kHz;
        only the last `config.window_seconds` are used)."""
        x = window(pcm16k_tail, self.config)[None]
        return float(torch.sigmoid(self.net(features(x, self.config)))[0])

    def save(self, path) -> Path:
        from safetensors.torch import save_file
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"save the turn-end model as a .safetensors file, got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(path), metadata={"format": FORMAT,
                                              "config": json.dumps(asdict(self.config))})
        return path

    @classmethod
    def load(cls, path) -> "TurnEndPredictor":
        from safetensors import safe_open
        from safetensors.torch import load_file
        path = Path(path)
        if path.is_dir():
            path = path / "turn_end.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no turn-end model at {path}; train one with `python -m "
                                    f"lab.train_turn_end --out runs/turn_end`")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"{path} is not a turn-end model (metadata format "
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        net = TurnEndNet(TurnEndConfig.from_dict(json.loads(meta["config"])))
        net.load_state_dict(load_file(str(path)))
        return cls(net)
