"""Generator: prefill, then backbone steps (text, then audio) interleaved with MCTP steps,
yielding text tokens, audio frames and decoded PCM chunks as soon as they are ready.

The generator owns sampling and state; the model only computes. Every buffer is allocated
once per Generator (KV caches, input embeddings, per-level hidden states) and reused for
every turn, so memory does not grow with the conversation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Union

import numpy as np
import torch

from .model import FusionModel, Prefix

MODES = ("vanilla", "mctp")


@dataclass(frozen=True)
class GenerationOptions:
    mode: str = "mctp"              # "vanilla": one token per backbone step; "mctp": K+1 audio tokens
    temperature: float = 0.0        # 0 = greedy
    top_k: int = 0                  # 0 = no top-k filtering
    seed: int | None = 0            # sampling seed (greedy ignores it)
    max_text_tokens: int = 24
    max_audio_seconds: float = 4.0
    min_audio_seconds: float = 0.0  # EOA is not allowed before this (benchmarks use it)
    chunk_frames: int = 2           # codec frames per PCM chunk handed to the speaker

    def __post_init__(self):
        errors = []
        if self.mode not in MODES:
            errors.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.temperature < 0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            errors.append(f"top_k must be >= 0, got {self.top_k}")
        if self.max_text_tokens < 1 or self.max_audio_seconds <= 0:
            errors.append("max_text_tokens must be >= 1 and max_audio_seconds > 0")
        if not 0 <= self.min_audio_seconds <= self.max_audio_seconds:
            errors.append("min_audio_seconds must be within [0, max_audio_seconds]")
        if self.chunk_frames < 1:
            errors.append(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if errors:
            raise ValueError("GenerationOptions: " + "; ".join(errors))


@dataclass
class TextToken:
    t: float          # seconds since generation start
    token: int
    text: str


@dataclass
class AudioFrame:
    t: float
    codes: torch.Tensor  # (n_q,) one codec frame


@dataclass
class PCMChunk:
    t: float
    pcm: np.ndarray      # (n,) float32 mono at sample_rate
    sample_rate: int
    start_sample: int    # offset of this chunk in the reply's audio


@dataclass
class GenerationStats:
    mode: str
    backbone_forwards: int = 0      # including the prefill
    mctp_forwards: int = 0          # module passes (each module counts once)
    text_tokens: int = 0
    audio_tokens: int = 0
    audio_frames: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    first_audio_token_s: float | None = None
    first_pcm_s: float | None = None

    @property
    def backbone_forwards_per_audio_second(self) -> float:
        return self.backbone_forwards / max(self.audio_seconds, 1e-9)

    @property
    def real_time_factor(self) -> float:
        """Seconds of reply audio generated per second of wall time."""
        return self.audio_seconds / max(self.wall_seconds, 1e-9)


@dataclass
class GenerationDone:
    t: float
    text: str
    text_tokens: list[int]
    codes: torch.Tensor             # (n_q, F)
    stats: GenerationStats = field(repr=False)


Event = Union[TextToken, AudioFrame, PCMChunk, GenerationDone]


class Generator:
    def __init__(self, model: FusionModel, codec=None, options: GenerationOptions = GenerationOptions()):
        if codec is not None and (codec.n_q, codec.bins) != (model.layout.n_q, model.layout.bins):
            raise ValueError(f"codec has {codec.n_q}x{codec.bins} codes but the model was trained "
                             f"for {model.layout.n_q}x{model.layout.bins}")
        self.model, self.codec, self.options = model, codec, options
        if options.mode == "mctp" and len(model.mctp) == 0:
            raise ValueError("mode='mctp' needs a model with MCTP modules (mctp_k > 0)")
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        c = model.config
        L, D, K = c.max_seq_len, c.d_model, len(model.mctp)
        self.E = torch.zeros(L, D, device=self.device, dtype=self.dtype)          # input embeddings
        self.H = torch.zeros(K + 1, L, D, device=self.device, dtype=self.dtype)   # h0..hK per position
        self.cache = model.backbone.new_cache(1, self.device, self.dtype)
        self.mcaches = [m.new_cache(1, self.device, self.dtype) for m in model.mctp.modules_]
        self.decoder = codec.streaming_decoder(batch=1) if codec is not None else None

    def with_options(self, **kw) -> "Generator":
        from dataclasses import replace
        return Generator(self.model, self.codec, replace(self.options, **kw))

    @torch.inference_mode()
    def run(self, prefix: Prefix, t0: float | None = None) -> Iterator[Event]:
        """Generates one reply for a batch-1 prefix, yielding events as they are ready."""
        assert prefix.embeds.shape[0] == 1, ("batch-1 generation", prefix.embeds.shape)
        m, o, lay = self.model, self.options, self.model.layout
        t0 = time.perf_counter() if t0 is None else t0
        now = lambda: time.perf_counter() - t0  # noqa: E731
        rng = torch.Generator(device="cpu")
        if o.seed is not None:
            rng.manual_seed(o.seed)
        stats = GenerationStats(mode=o.mode)
        if self.decoder is not None:
            self.decoder.reset()
        if hasattr(self.cache, "crop"):  # Hugging Face cache: start empty each turn
            self.cache = m.backbone.new_cache(1, self.device, self.dtype)
        frame_rate = m.config.codec.frame_rate
        max_frames = int(o.max_audio_seconds * frame_rate)
        min_frames = int(o.min_audio_seconds * frame_rate)
        E, H = self.E, self.H

        P = int(prefix.length[0])
        E[:P] = prefix.embeds[0, :P].to(self.dtype)
        E[P] = m.embed.weight[lay.assistant] if prefix.start is None else prefix.start[0].to(self.dtype)
        pos = self._backbone(0, P + 1, stats)          # prefill: [clues][question][ASSISTANT]
        m_pos = 0                                      # MCTP modules have processed [0, m_pos)

        text_ids: list[int] = []
        audio: list[int] = []                          # flattened codes of complete + partial frames
        frames: list[torch.Tensor] = []
        pending = 0                                    # complete frames not yet decoded
        sr = self.codec.sample_rate if self.codec is not None else 0
        n_samples = 0

        # text phase: one token per backbone step
        while True:
            tok = self._sample(m.text_logits(H[0, pos - 1]), rng)
            if len(text_ids) + 1 >= o.max_text_tokens and tok != lay.eot:
                tok = lay.eot
            stats.text_tokens += 1
            if tok != lay.eot:
                text_ids.append(tok)
                yield TextToken(now(), tok, self._decode_text([tok]))
            E[pos] = m.embed.weight[tok]
            pos = self._backbone(pos, pos + 1, stats)
            if tok == lay.eot:
                break

        # audio phase: each backbone step gives one token; MCTP mode adds K more
        done = False
        room = E.shape[0] - (len(m.mctp) if o.mode == "mctp" else 0)  # a step writes E[pos:pos+K+1]
        while not done and len(frames) < max_frames and pos < room:
            b = pos - 1
            new: list[int] = []
            logits = m.audio_logits(H[0, b], len(audio) % lay.n_q)
            if len(frames) < min_frames:
                logits[0] = float("-inf")
            tok = self._sample(logits, rng) + lay.eoa
            if tok == lay.eoa:
                break
            new.append(tok)
            E[b + 1] = m.embed.weight[tok]
            if o.mode == "mctp":
                for k, module in enumerate(m.mctp.modules_, start=1):
                    h = module(H[k - 1, m_pos:b + 1][None], E[m_pos + k:b + k + 1][None], m_pos,
                               self.mcaches[k - 1])[0]                                  # (b+1-m_pos, D)
                    H[k, m_pos:b + 1] = h
                    stats.mctp_forwards += 1
                    logits = m.audio_logits(h[-1], (len(audio) + k) % lay.n_q)
                    if (len(audio) + k) // lay.n_q < min_frames:
                        logits[0] = float("-inf")
                    tok = self._sample(logits, rng) + lay.eoa
                    if tok == lay.eoa:
                        done = True
                        break
                    new.append(tok)
                    E[b + 1 + k] = m.embed.weight[tok]
                m_pos = b + 1
            for tok in new:
                audio.append(tok)
                stats.audio_tokens += 1
                if stats.first_audio_token_s is None:
                    stats.first_audio_token_s = now()
                if len(audio) % lay.n_q == 0:
                    codes = torch.tensor(audio[-lay.n_q:]) - lay.audio_base
                    codes -= torch.arange(lay.n_q) * lay.bins
                    frames.append(codes)
                    pending += 1
                    yield AudioFrame(now(), codes)
            if self.decoder is not None and pending >= o.chunk_frames:
                chunk = self._decode(frames[-pending:])
                pending = 0
                if stats.first_pcm_s is None:
                    stats.first_pcm_s = now()
                yield PCMChunk(now(), chunk, sr, n_samples)
                n_samples += len(chunk)
            if not done and len(frames) < max_frames:
                pos = self._backbone(pos, pos + len(new), stats)
        if self.decoder is not None and pending:
            chunk = self._decode(frames[-pending:])
            if stats.first_pcm_s is None:
                stats.first_pcm_s = now()
            yield PCMChunk(now(), chunk, sr, n_samples)
        stats.audio_frames = len(frames)
        stats.audio_seconds = len(frames) / frame_rate
        stats.wall_seconds = now()
        codes = torch.stack(frames, 1) if frames else torch.zeros(lay.n_q, 0, dtype=torch.long)
        yield GenerationDone(now(), self._decode_text(text_ids), text_ids, codes, stats)

    # --- pieces -----------------------------------------------------------------------------
    def _backbone(self, start: int, end: int, stats: GenerationStats) -> int:
        h = self.model.backbone(self.E[start:end][None], start, self.cache)[0]  # (end-start, D)
        self.H[0, start:end] = h
        stats.backbone_forwards += 1
        return end

    def _sample(self, logits: torch.Tensor, rng: torch.Generator) -> int:
        o = self.options
        logits = logits.float().cpu()
        if o.temperature == 0:
            return int(logits.argmax())
        if o.top_k:
            kth = torch.topk(logits, min(o.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits / o.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=rng))

    def _decode(self, frames: list[torch.Tensor]) -> np.ndarray:
        codes = torch.stack(frames, 1)[None].to(self.device)                    # (1, n_q, f)
        return self.decoder.decode(codes)[0, 0].float().cpu().numpy()

    def _decode_text(self, ids: list[int]) -> str:
        from .tokens import get_tokenizer
        return get_tokenizer(self.model.config.tokenizer).decode(ids)
