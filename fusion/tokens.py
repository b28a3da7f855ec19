"""Token layout: one id space for text and audio, read out by two tied heads.

ids [0, n_text)                text tokens (Whisper's tokenizer; its <|endoftext|> ends the text)
n_text                         ASSISTANT: starts the reply (input only)
n_text + 1                     EOA: end of audio
n_text + 2 + q * bins + code   audio token: codebook q (0..n_q-1), code (0..bins-1)

A reply is `ASSISTANT text... EOT (c0 c1 .. c{n_q-1})* EOA`: codec frames are flattened
codebook by codebook. The text head scores ids [0, n_text); the audio head scores
[EOA, vocab) and is masked per position to the codebook that position holds (EOA only at a
frame start). Separate heads because which kind comes next is never in doubt (the phase is
known from the sequence), so neither kind wastes probability on the other, and the MCTP
modules, which only ever emit audio, evaluate the small audio head alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class TokenLayout:
    n_text: int
    n_q: int
    bins: int
    eot: int  # the tokenizer's end-of-text id

    @property
    def assistant(self) -> int:
        return self.n_text

    @property
    def eoa(self) -> int:
        return self.n_text + 1

    @property
    def audio_base(self) -> int:
        return self.n_text + 2

    @property
    def vocab_size(self) -> int:
        return self.audio_base + self.n_q * self.bins

    @property
    def n_audio_logits(self) -> int:
        return 1 + self.n_q * self.bins  # EOA + codes

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """(n_q, F) codec codes -> (F * n_q,) token ids, frame by frame."""
        assert codes.dim() == 2 and codes.shape[0] == self.n_q, (tuple(codes.shape), self.n_q)
        q = torch.arange(self.n_q, device=codes.device)[:, None]
        return (self.audio_base + q * self.bins + codes.long()).T.reshape(-1)

    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(F * n_q,) audio token ids -> (n_q, F) codes."""
        t = tokens.long().reshape(-1, self.n_q) - self.audio_base  # (F, n_q)
        q = torch.arange(self.n_q, device=t.device)[None, :]
        codes = t - q * self.bins
        assert bool(((codes >= 0) & (codes < self.bins)).all()), "token out of its codebook's range"
        return codes.T.contiguous()

    def audio_mask(self, device=None) -> torch.Tensor:
        """(n_q, n_audio_logits) bool: which audio-head outputs codebook position q may emit."""
        return _audio_mask(self.n_q, self.bins, str(device or "cpu"))


@lru_cache(maxsize=8)
def _audio_mask(n_q: int, bins: int, device: str) -> torch.Tensor:
    m = torch.zeros(n_q, 1 + n_q * bins, dtype=torch.bool)
    for q in range(n_q):
        m[q, 1 + q * bins: 1 + (q + 1) * bins] = True
    m[0, 0] = True  # EOA only where a new frame would start
    return m.to(device)


@lru_cache(maxsize=4)
def get_tokenizer(name: str):
    """The text tokenizer named in a FusionConfig ("whisper:gpt2" or "whisper:multilingual")."""
    kind, _, which = name.partition(":")
    if kind != "whisper" or which not in ("gpt2", "multilingual"):
        raise ValueError(f"unknown tokenizer {name!r}: use 'whisper:gpt2' or 'whisper:multilingual'")
    from whisper.tokenizer import get_tokenizer as whisper_tokenizer
    return whisper_tokenizer(multilingual=(which == "multilingual"))


def layout_for(config) -> TokenLayout:
    tok = get_tokenizer(config.tokenizer)
    return TokenLayout(n_text=config.n_text, n_q=config.codec.n_q, bins=config.codec.bins, eot=tok.eot)
