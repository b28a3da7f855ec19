"""Vision encoder: camera frames -> a small grid of feature tokens per frame.

`PatchVisionEncoder` is a from-scratch ViT-style encoder sized for the demo world (colour,
shape, left/middle/right position and size pulses of 1-3 objects). Other encoders (e.g. a
pretrained one) plug in through `VISION_ENCODERS`; see `build_vision_encoder`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VisionConfig:
    image_size: tuple[int, int] = (96, 72)   # (W, H) frames are resized to
    width: int = 128                         # token dimension
    layers: int = 2                          # transformer blocks
    heads: int = 4
    patch: int = 8                           # px per patch side (conv stride)
    grid: tuple[int, int] = (3, 3)           # (cols, rows) output tokens per frame
    kind: str = "patch"                      # key in VISION_ENCODERS
    mlp_ratio: int = 4
    pos_emb: bool = True                     # learned absolute position embedding of the patches

    def __post_init__(self):
        # JSON round trips turn tuples into lists: normalise here, the one place we validate
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))
        w, h = self.image_size
        if len(self.image_size) != 2 or w <= 0 or h <= 0:
            raise ValueError(f"VisionConfig.image_size must be (W, H) > 0, got {self.image_size}")
        if self.patch <= 0 or w % self.patch or h % self.patch:
            raise ValueError(f"VisionConfig.image_size {self.image_size} must be divisible by "
                             f"patch {self.patch}")
        cols, rows = self.patch_grid
        if (len(self.grid) != 2 or not 0 < self.grid[0] <= cols
                or not 0 < self.grid[1] <= rows):
            raise ValueError(f"VisionConfig.grid (cols, rows) = {self.grid} must be within the "
                             f"patch grid {self.patch_grid} of image {self.image_size} / patch "
                             f"{self.patch}")
        if self.width <= 0 or self.heads <= 0 or self.width % self.heads:
            raise ValueError(f"VisionConfig.heads ({self.heads}) must divide width "
                             f"({self.width})")
        if self.layers < 0 or self.mlp_ratio <= 0:
            raise ValueError(f"VisionConfig needs layers >= 0 and mlp_ratio > 0, got "
                             f"{self.layers}, {self.mlp_ratio}")
        if not (isinstance(self.kind, str) and self.kind):
            raise ValueError(f"VisionConfig.kind must be a non-empty string, got {self.kind!r}")
        if self.kind == "conv" and (self.patch < 2 or self.patch & (self.patch - 1)):
            raise ValueError(f"VisionConfig kind 'conv' needs a power-of-two patch >= 2 (one "
                             f"stride-2 convolution per halving), got {self.patch}")

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(cols, rows) of patches."""
        return self.image_size[0] // self.patch, self.image_size[1] // self.patch

    @property
    def n_tokens(self) -> int:
        """Output tokens per frame (rows * cols)."""
        return self.grid[0] * self.grid[1]


VISION_PRESETS: dict[str, VisionConfig] = {
    "tiny": VisionConfig(image_size=(48, 36), width=32, layers=1, heads=2, patch=6),
    # conv stem: with a single linear 8x8 patch embedding the demo encoder told colours apart
    # within a few hundred CPU steps but still confused circle/square/triangle. No position
    # embedding: with one, the encoder tied colour-shape pairs to the slots it saw them in and
    # could not read the test split's held-out triples (the fusion model adds a cell embedding)
    "demo": VisionConfig(image_size=(96, 72), width=128, layers=2, heads=4, patch=8, kind="conv",
                         pos_emb=False),
}


def preprocess(images, config: VisionConfig) -> torch.Tensor:
    """BGR uint8 frames (a list of (H, W, 3) of any sizes, one (H, W, 3) or a (B, H, W, 3)
    array) -> (B, 3, H, W) float32 RGB in [0, 1] at config.image_size (cv2.INTER_AREA)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, np.ndarray):
        images = [images]
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("preprocess expects a non-empty list of (H, W, 3) uint8 BGR images "
                         f"or one such array, got {type(images).__name__}")
    w, h = config.image_size
    out = np.empty((len(images), h, w, 3), np.uint8)                    # (B, H, W, 3)
    for i, img in enumerate(images):
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3
                and img.shape[2] == 3 and img.shape[0] > 0 and img.shape[1] > 0):
            got = (type(img).__name__, getattr(img, "shape", None), getattr(img, "dtype", None))
            raise ValueError(f"preprocess: image {i} must be an (H, W, 3) uint8 BGR array "
                             f"(as cv2 reads it), got {got}")
        resized = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        cv2.cvtColor(resized, cv2.COLOR_BGR2RGB, dst=out[i])
    x = torch.from_numpy(out).permute(0, 3, 1, 2)                        # (B, 3, H, W)
    return x.to(torch.float32).div_(255.0).contiguous()


def _pool_centres(n_in: int, n_out: int) -> torch.Tensor:
    """Normalised centres of adaptive_avg_pool's n_out bins over n_in cells."""
    starts = [(i * n_in) // n_out for i in range(n_out)]
    ends = [-((-(i + 1) * n_in) // n_out) for i in range(n_out)]
    return torch.tensor([(s + e) / 2 / n_in for s, e in zip(starts, ends)])


class Block(nn.Module):
    """Pre-norm transformer block (self-attention over patches + MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape                                                # (B, N, D)
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                             # 3 x (B, h, N, D/h)
        a = F.scaled_dot_product_attention(q, k, v)                      # (B, h, N, D/h)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))                               # (B, N, D)


def conv_stem(width: int, patch: int) -> nn.Sequential:
    """log2(patch) stride-2 3x3 convolutions (channels growing to `width`): the same patch grid
    as one patch x patch linear embedding, but with local edge/corner detectors before the
    transformer, which is what telling shapes apart needs."""
    n = patch.bit_length() - 1
    assert patch == 1 << n and n >= 1, ("conv stem needs a power-of-two patch", patch)
    chans = [3] + [max(16, width >> (n - 1 - i)) for i in range(n)]
    layers: list[nn.Module] = []
    for i in range(n):
        conv = nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # torch's default init shrinks
        nn.init.zeros_(conv.bias)                                  # the image ~3x per layer
        layers.append(conv)
        if i < n - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class PatchVisionEncoder(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] -> (B, rows * cols, width) tokens, row-major over `grid`.
    `config.kind` "patch": linear patch embedding (ViT); "conv": a small conv stem."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        c = config
        gw, gh = c.patch_grid
        if c.kind == "conv":
            self.embed = conv_stem(c.width, c.patch)
        else:
            self.embed = nn.Conv2d(3, c.width, kernel_size=c.patch, stride=c.patch)
        # without pos_emb the encoder is translation-equivariant up to the conv padding: an object
        # gives the same tokens wherever it stands, and position is left to the caller's grid
        self.pos = nn.Parameter(torch.randn(1, c.width, gh, gw) * 0.02) if c.pos_emb else None
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio)
                                    for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width)
        cols, rows = c.grid
        xs, ys = _pool_centres(gw, cols), _pool_centres(gh, rows)
        xy = torch.stack([xs.repeat(rows), ys.repeat_interleave(cols)], dim=1)  # (N, 2)
        self.register_buffer("_xy", xy.float(), persistent=False)

    @property
    def n_tokens(self) -> int:
        return self.config.n_tokens

    def token_xy(self) -> torch.Tensor:
        """(N, 2) normalised (x, y) centre of each output token, in the order of forward()."""
        return self._xy

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        w, h = c.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, h, w):
            raise ValueError(f"PatchVisionEncoder expects (B, 3, {h}, {w}) images from "
                             f"preprocess(), got {tuple(images.shape)}")
        x = self.embed((images - 0.5) * 4.0)                             # (B, D, gh, gw)
        if self.pos is not None:
            x = x + self.pos
        b, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)                                 # (B, gh*gw, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x).transpose(1, 2).reshape(b, d, gh, gw)           # (B, D, gh, gw)
        cols, rows = c.grid
        x = F.adaptive_avg_pool2d(x, (rows, cols))                       # (B, D, rows, cols)
        return x.flatten(2).transpose(1, 2)                              # (B, rows*cols, D)


# Registry of encoder kinds. To plug in a pretrained encoder, add a factory
# `config -> nn.Module` here (or call VISION_ENCODERS[...] = factory at import time). The
# module must take preprocess() output (B, 3, H, W) and return (B, config.n_tokens,
# config.width) tokens, and expose token_xy() -> (N, 2); wrap the pretrained model with a
# projection to `width` and a pooling to `grid` so everything downstream stays unchanged.
VISION_ENCODERS: dict[str, Callable[[VisionConfig], nn.Module]] = {
    "patch": PatchVisionEncoder,
    "conv": PatchVisionEncoder,
}


def build_vision_encoder(config: VisionConfig) -> nn.Module:
    """The encoder for config.kind; NotImplementedError for kinds nobody registered."""
    factory = VISION_ENCODERS.get(config.kind)
    if factory is None:
        raise NotImplementedError(f"no vision encoder of kind {config.kind!r}; known kinds: "
                                  f"{sorted(VISION_ENCODERS)}. A pretrained encoder plugs in by "
                                  f"adding a factory to vision.encoder.VISION_ENCODERS.")
    return factory(config)
