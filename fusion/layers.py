"""Transformer pieces shared by the backbone, the aggregator and the MCTP modules."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """Preallocated keys/values for a stack of attention layers: memory is fixed at creation
    (`max_len` positions) and never grows with the length of a reply."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def layer(self, i: int) -> "LayerCache":
        return LayerCache(self.k[i], self.v[i])

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class LayerCache:
    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (B, H, max_len, hd) views into the KVCache

    def write(self, pos: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        if pos + T > self.k.shape[2]:
            raise RuntimeError(f"sequence too long: {pos + T} > max_seq_len {self.k.shape[2]}; "
                               "lower max_audio_seconds or raise max_seq_len")
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


class SelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        assert d % n_head == 0, (d, n_head)
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, pos: int = 0, cache: LayerCache | None = None, key_mask=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.write(pos, k, v)  # (B, H, pos+T, hd)
        S = k.shape[2]
        # query i sits at absolute position pos+i and sees keys 0..pos+i
        causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        mask = causal[None, None]
        if key_mask is not None:  # (B, S) True = real token
            mask = mask & key_mask[:, None, None, :S]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    """Queries attend over a memory; returns the output and the attention weights."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, mem, mem_mask=None):
        B, T, D = x.shape
        S, H = mem.shape[1], self.n_head
        q = self.q(x).view(B, T, H, D // H).transpose(1, 2)               # (B, H, T, hd)
        k, v = self.kv(mem).split(D, dim=2)
        k = k.view(B, S, H, D // H).transpose(1, 2)                        # (B, H, S, hd)
        v = v.view(B, S, H, D // H).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)                # (B, H, T, S)
        if mem_mask is not None:
            att = att.masked_fill(~mem_mask[:, None, None, :], float("-inf"))
        att = att.softmax(-1).nan_to_num(0.0)  # an all-masked row attends to nothing
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        return self.out(y), att


class MLP(nn.Module):
    def __init__(self, d: int, ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d, ratio * d)
        self.proj = nn.Linear(ratio * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm causal transformer block (nanoGPT style) with an optional KV cache."""

    def __init__(self, d: int, n_head: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, n_head, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, mlp_ratio, dropout)

    def forward(self, x, pos: int = 0, cache: LayerCache | None = None, key_mask=None):
        x = x + self.attn(self.ln1(x), pos, cache, key_mask)
        return x + self.mlp(self.ln2(x))


class TimeEmbedding(nn.Module):
    """Seconds (relative to the end of the question) -> (…, D). Audio and video features of
    the same moment get the same embedding, so the aggregator can line them up."""

    def __init__(self, d: int, n_freqs: int = 16, min_period: float = 0.1, max_period: float = 20.0):
        super().__init__()
        periods = torch.logspace(math.log10(min_period), math.log10(max_period), n_freqs)
        self.register_buffer("omega", 2 * math.pi / periods, persistent=False)
        self.proj = nn.Linear(2 * n_freqs, d)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t.float()[..., None] * self.omega                              # (…, F)
        return self.proj(torch.cat([a.sin(), a.cos()], dim=-1))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T, D) over the T positions where mask (B, T) is True -> (B, D); 0 if none."""
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def column_means(tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """Row-major (B, rows * cols, D) grid tokens -> (B, cols, D), each column's mean (one per
    slot of the demo world's left / middle / right)."""
    B, N, D = tokens.shape
    assert N % rows == 0, ("tokens must fill whole rows", N, rows)
    return tokens.view(B, rows, N // rows, D).mean(1)


def pool_time(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool (B, T, D) along T by `factor` (a partial last window is averaged too)."""
    if factor == 1:
        return x
    B, T, D = x.shape
    pad = (-T) % factor
    if pad:
        x = torch.cat([x, x[:, -1:].expand(B, pad, D)], dim=1)
    return x.view(B, -1, factor, D).mean(2)
