"""Backbone LM: a decoder-only transformer over input embeddings, with a preallocated KV
cache; or any Hugging Face causal LM (optional `transformers`) behind the same interface."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Block, KVCache


class NativeBackbone(nn.Module):
    def __init__(self, d: int, n_layer: int, n_head: int, max_len: int, mlp_ratio: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.d, self.n_head, self.max_len = d, n_head, max_len
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_head, mlp_ratio, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)

    def new_cache(self, batch: int, device=None, dtype=torch.float32) -> KVCache:
        return KVCache(len(self.blocks), batch, self.n_head, self.max_len, self.d // self.n_head,
                       device=device, dtype=dtype)

    def forward(self, x, pos: int = 0, cache: KVCache | None = None, key_mask=None):
        # x (B, T, D) input embeddings at absolute positions pos..pos+T-1 -> (B, T, D)
        T = x.shape[1]
        if pos + T > self.max_len:
            raise RuntimeError(f"sequence too long: {pos + T} > max_seq_len {self.max_len}")
        x = x + self.pos(torch.arange(pos, pos + T, device=x.device))
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cache.layer(i) if cache is not None else None, key_mask)
        return self.ln_f(x)


class HFBackbone(nn.Module):
    """A Hugging Face causal LM used through `inputs_embeds` (its own vocabulary is unused:
    Tandem's embedding and heads stay in charge). Width adapters when sizes differ."""

    def __init__(self, d: int, max_len: int, hf_model: str | None = None, hf_config: dict | None = None):
        super().__init__()
        try:
            import transformers
        except ImportError as e:
            raise ImportError("backbone='hf' needs transformers: pip install transformers") from e
        if hf_model:
            lm = transformers.AutoModelForCausalLM.from_pretrained(hf_model)
        else:
            cfg = transformers.AutoConfig.for_model(**hf_config)
            lm = transformers.AutoModelForCausalLM.from_config(cfg)
        self.lm = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
        h = self.lm.config.hidden_size
        self.max_len = max_len
        self.inp = nn.Identity() if h == d else nn.Linear(d, h)
        self.outp = nn.Identity() if h == d else nn.Linear(h, d)

    def new_cache(self, batch: int, device=None, dtype=torch.float32):
        from transformers import DynamicCache
        return DynamicCache()

    def forward(self, x, pos: int = 0, cache=None, key_mask=None):
        T = x.shape[1]
        if pos + T > self.max_len:
            raise RuntimeError(f"sequence too long: {pos + T} > max_seq_len {self.max_len}")
        position_ids = torch.arange(pos, pos + T, device=x.device)[None].expand(x.shape[0], T)
        attn = None
        if key_mask is not None:
            attn = key_mask[:, :pos + T].long()
        out = self.lm(inputs_embeds=self.inp(x), position_ids=position_ids, attention_mask=attn,
                      past_key_values=cache, use_cache=cache is not None)
        return self.outp(out.last_hidden_state)


def build_backbone(cfg) -> nn.Module:
    if cfg.backbone == "hf":
        return HFBackbone(cfg.d_model, cfg.max_seq_len, cfg.hf_model, cfg.hf_config)
    return NativeBackbone(cfg.d_model, cfg.n_layer, cfg.n_head, cfg.max_seq_len, cfg.mlp_ratio, cfg.dropout)
