"""Random inputs of the right shapes, for tests and benchmarks (never for training)."""
from __future__ import annotations

import torch

from .model import SceneFeatures


def random_features(config, batch: int = 1, question_frames: int = 60, audio_frames: int = 300,
                    n_frames: int = 30, seed: int = 0, device="cpu") -> SceneFeatures:
    g = torch.Generator().manual_seed(seed)
    B, Da, Dv, N = batch, config.audio.n_state, config.vision.width, config.vision.n_tokens
    qlen = torch.full((B,), question_frames)
    if B > 1:  # uneven lengths exercise the padding paths
        qlen = torch.randint(question_frames // 2, question_frames + 1, (B,), generator=g)
        qlen[0] = question_frames
    span = config.context_seconds
    f = SceneFeatures(
        question=torch.randn(B, question_frames, Da, generator=g),
        question_len=qlen,
        audio=torch.randn(B, audio_frames, Da, generator=g),
        audio_times=torch.linspace(-span, 0, audio_frames)[None].repeat(B, 1),
        audio_mask=torch.ones(B, audio_frames, dtype=torch.bool),
        frames=torch.randn(B, n_frames, N, Dv, generator=g),
        frame_times=torch.linspace(-span, 0, n_frames)[None].repeat(B, 1),
        frame_mask=torch.ones(B, n_frames, dtype=torch.bool),
    )
    return SceneFeatures(**{k: v.to(device) for k, v in vars(f).items()})
