"""MCTP head (VITA-Audio): K chained light modules, each adding one more audio token per
backbone step. Module k takes norm(previous hidden state) and norm(embedding of the previous
token), projects their concatenation and runs one transformer block; all modules share the
model's audio output head.

Position bookkeeping (training and generation alike): at sequence position p, the backbone's
hidden h0[p] predicts x[p+1]; module k combines h{k-1}[p] with emb(x[p+k]) into hk[p], which
predicts x[p+k+1]. So one backbone forward plus K module passes yield K+1 tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Block, KVCache


class MCTPModule(nn.Module):
    def __init__(self, d: int, n_head: int, n_layers: int = 1, mlp_ratio: int = 4, max_len: int = 512):
        super().__init__()
        self.n_head, self.d, self.max_len = n_head, d, max_len
        self.norm_h = nn.LayerNorm(d)
        self.norm_e = nn.LayerNorm(d)
        self.proj = nn.Linear(2 * d, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_head, mlp_ratio) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)

    def new_cache(self, batch: int, device=None, dtype=torch.float32) -> KVCache:
        return KVCache(len(self.blocks), batch, self.n_head, self.max_len, self.d // self.n_head,
                       device=device, dtype=dtype)

    def forward(self, h_prev, e_next, pos: int = 0, cache: KVCache | None = None, key_mask=None):
        # h_prev (B, T, D) hidden of the previous level; e_next (B, T, D) embeddings of the
        # tokens k positions ahead -> (B, T, D) hidden (pre-head, normalised)
        T = h_prev.shape[1]
        x = self.proj(torch.cat([self.norm_h(h_prev), self.norm_e(e_next)], dim=-1))
        x = x + self.pos(torch.arange(pos, pos + T, device=x.device))
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cache.layer(i) if cache is not None else None, key_mask)
        return self.ln_f(x)


class MCTPHead(nn.Module):
    def __init__(self, k: int, d: int, n_head: int, n_layers: int, max_len: int):
        super().__init__()
        self.modules_ = nn.ModuleList(MCTPModule(d, n_head, n_layers, max_len=max_len) for _ in range(k))

    def __len__(self) -> int:
        return len(self.modules_)

    def __getitem__(self, i: int) -> MCTPModule:
        return self.modules_[i]

    def forward_train(self, h0, emb, key_mask=None) -> list[torch.Tensor]:
        """Offline pass over whole sequences. h0 (B, L, D) backbone hidden; emb (B, L, D) input
        embeddings. Returns [h1, ..., hK], hk (B, L-k, D): hk[:, p] predicts x[p+k+1]."""
        outs, h = [], h0
        for k, module in enumerate(self.modules_, start=1):
            L = h.shape[1] - 1
            km = key_mask[:, :L] if key_mask is not None else None
            h = module(h[:, :L], emb[:, k:k + L], key_mask=km)
            outs.append(h)
        return outs
