"""Weight fingerprints: which weights a checkpoint was made with (codec, pretrained encoders)."""
from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """First 16 hex chars of sha256 over a state dict (names sorted; name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
