"""The fusion model: modality encoders -> projectors with time embeddings -> CAT clue
aggregator -> backbone LM over [clues][question][reply] -> text head, audio head, MCTP head.

The model only computes; sampling and streaming state live in `fusion.generator`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from speech.constants import AUDIO_FEATURE_RATE, SAMPLER_FPS
from speech.pretrained_audio import build_audio_encoder
from vision.encoder import build_vision_encoder

from .aggregator import AggregatorOutput, CellQuery, ClueAggregator, ClueReadout, MeanPoolClues, SoundCells
from .backbone import build_backbone
from .config import FusionConfig
from .layers import TimeEmbedding, masked_mean, pool_time
from .mctp import MCTPHead
from .tokens import TokenLayout, layout_for

IGNORE = -100
_QUESTION, _AUDIO, _VISION = 0, 1, 2
ENCODER_PARTS = ("audio", "vision")       # FusionModel.audio_encoder, .vision_encoder


def is_encoder_key(key: str, parts: tuple[str, ...] = ENCODER_PARTS) -> bool:
    """True for a state-dict key of the named encoders ("audio_encoder.*", "vision_encoder.*")."""
    return key.startswith(tuple(f"{p}_encoder." for p in parts))


@dataclass
class SceneFeatures:
    """Encoded inputs of one turn (a batch of turns). Times are seconds relative to the end
    of the question (so mostly negative)."""
    question: torch.Tensor        # (B, Tq, Da) audio-encoder frames of the question (50 Hz)
    question_len: torch.Tensor    # (B,) valid frames
    audio: torch.Tensor           # (B, Sa, Da) scene-audio encoder frames (50 Hz)
    audio_times: torch.Tensor     # (B, Sa)
    audio_mask: torch.Tensor      # (B, Sa) bool
    frames: torch.Tensor          # (B, Fv, N, Dv) per-frame vision tokens
    frame_times: torch.Tensor     # (B, Fv)
    frame_mask: torch.Tensor      # (B, Fv) bool


@dataclass
class Prefix:
    embeds: torch.Tensor          # (B, P, D) [clues][question], right-padded
    length: torch.Tensor          # (B,) valid prefix positions
    attn: torch.Tensor            # (B, Nc, S) aggregator attention over the context
    context_times: torch.Tensor   # (B, S) time of each context token
    context_kind: torch.Tensor    # (B, S) 1 = scene audio, 2 = video
    start: torch.Tensor | None = None  # (B, D) the reply's first input (ASSISTANT), question-aware
    cells: torch.Tensor | None = None  # (B, N, D) pooled cell clues (pooled_clues), as the LM reads them


@dataclass
class Losses:
    total: torch.Tensor
    text: torch.Tensor
    audio: torch.Tensor
    mctp: list[torch.Tensor]
    n_text: int
    n_audio: int
    cells: torch.Tensor | None = None  # Prefix.cells, for auxiliary losses of the trainer


class FusionModel(nn.Module):
    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = c = config
        self.layout: TokenLayout = layout_for(c)
        D = c.d_model
        self.audio_encoder = build_audio_encoder(c.audio)  # pretrained: frozen Whisper + adapter
        if self.audio_encoder.config != c.audio:  # records the pretrained weights' fingerprint
            self.config = c = c.replace(audio=self.audio_encoder.config)
        self.vision_encoder = build_vision_encoder(c.vision)
        self.audio_proj = nn.Sequential(nn.Linear(c.audio.n_state, D), nn.GELU(), nn.Linear(D, D))
        self.vision_proj = nn.Sequential(nn.Linear(c.vision.width, D), nn.GELU(), nn.Linear(D, D))
        # av_sync: each frame's tokens also carry the scene audio heard around that frame, so one
        # attention score can single out "this cell pulses WHILE it beeps" (a silent distractor
        # pulse or a beep alone scores lower); the frames are 1/SAMPLER_FPS apart
        self.sync_proj = (nn.Sequential(nn.Linear(c.audio.n_state, D), nn.GELU(), nn.Linear(D, D))
                          if c.av_sync else None)
        self.time_emb = TimeEmbedding(D, c.time_freqs)
        self.kind_emb = nn.Embedding(3, D)                     # question / scene audio / video
        n_cells = c.vision.grid[0] * c.vision.grid[1]
        self.cell_emb = nn.Embedding(n_cells, D)
        if c.aggregator == "cat":
            self.aggregator = ClueAggregator(D, c.n_head, c.n_clues, c.agg_layers)
            # pooled_clues: the static summary (what the "mean" ablation has) travels beside the
            # question-conditioned clues, so the LM reads what is where from the first steps
            # while the aggregator learns the routing that needs time (which object pulsed with
            # which beep); the ablation table measures what the aggregator adds on top.
            self.pooled = MeanPoolClues(D, n_cells) if c.pooled_clues else None
            self.cell_query = CellQuery(D, c.n_head) if c.cell_query else None
            self.sound_cells = SoundCells(c.vision.width, c.audio.n_state, D) if c.sound_cells else None
        else:
            self.aggregator = MeanPoolClues(D, n_cells)
            self.pooled = None                                 # its clues are pooled already
            self.cell_query = None
            self.sound_cells = None
        self.embed = nn.Embedding(self.layout.vocab_size, D)  # text + specials + audio, tied heads
        # question_query: the ASSISTANT input carries a summary of the question and all the
        # clues (flattened: a linear map of the whole scene), so the position that predicts the
        # answer starts from the scene instead of having to find each fact by attention
        self.q_query = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D)) if c.question_query else None
        self.c_norm = nn.LayerNorm(D) if c.question_query else None
        n_read = c.n_prefix_clues if c.query_clues == "all" else 1   # "audio": the last pooled clue
        self.c_query = nn.Linear(n_read * D, D) if c.question_query else None
        self.readout = ClueReadout(D, c.n_head) if c.clue_readout else None
        self.backbone = build_backbone(c)
        self.mctp = MCTPHead(c.mctp_k, D, c.n_head, c.mctp_layers, c.max_seq_len)
        self.apply(_init)

    # --- encoders (run as inputs arrive) --------------------------------------------------
    def encode_audio(self, mel: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_mels, T_mel) log-mel -> (B, ceil(T_mel/2), Da) at 50 Hz."""
        return self.audio_encoder(mel, lengths)

    def encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed frames -> (N, cells, Dv)."""
        return self.vision_encoder(images)

    # --- fusion ---------------------------------------------------------------------------
    def prefix(self, s: SceneFeatures) -> Prefix:
        c = self.config
        B = s.question.shape[0]
        dev = s.question.device
        # question tokens, pooled to question_pool
        qf = pool_time(s.question, c.question_pool)                                  # (B, Tq', Da)
        qlen = (s.question_len + c.question_pool - 1) // c.question_pool             # (B,)
        Tq = qf.shape[1]
        qmask = torch.arange(Tq, device=dev)[None] < qlen[:, None]                   # (B, Tq')
        q_t = (torch.arange(Tq, device=dev)[None] - qlen[:, None] + 1).float() * (c.question_pool / AUDIO_FEATURE_RATE)
        question = self.audio_proj(qf) + self.time_emb(q_t) + self.kind_emb.weight[_QUESTION]
        q_mean = masked_mean(question, qmask)                                        # (B, D)
        # context tokens: scene audio and/or video, time-stamped
        parts, masks, times, kinds, cells = [], [], [], [], []
        frames = heard = None                                                        # (B, Fv, N, D), (B, Fv, Da)
        audio_mask = s.audio_mask                                                    # (B, Sa)
        if c.scene_audio_only:  # the scene is silent while the user asks: drop their speech
            q_start = -s.question_len.to(s.audio_times.dtype) / AUDIO_FEATURE_RATE      # (B,)
            audio_mask = audio_mask & (s.audio_times < q_start[:, None])
        use_audio = "audio" in c.modalities and s.audio.shape[1] > 0
        if use_audio:
            af = pool_time(s.audio, c.context_audio_pool)                            # (B, Sa', Da)
            at = pool_time(s.audio_times[..., None], c.context_audio_pool)[..., 0]
            am = pool_time(audio_mask[..., None].float(), c.context_audio_pool)[..., 0] > 0.5
            parts.append(self.audio_proj(af) + self.time_emb(at) + self.kind_emb.weight[_AUDIO])
            masks.append(am), times.append(at)
            kinds.append(torch.full_like(am, _AUDIO, dtype=torch.long))
            cells.append(torch.full_like(am, -1, dtype=torch.long))
        if "vision" in c.modalities and s.frames.shape[1] > 0:
            _, Fv, N, _ = s.frames.shape
            vt = s.frame_times[:, :, None].expand(B, Fv, N)                          # (B, Fv, N)
            v = self.vision_proj(s.frames) + self.time_emb(vt) + self.cell_emb.weight[None, None]
            if (self.sync_proj is not None or self.sound_cells is not None) and use_audio:
                gap = (s.audio_times[:, None, :] - s.frame_times[:, :, None]).abs()  # (B, Fv, Sa)
                near = ((gap <= 0.5 / SAMPLER_FPS) & audio_mask[:, None, :]).to(v.dtype)
                heard = near @ s.audio.to(v.dtype) / near.sum(-1, keepdim=True).clamp(min=1)  # (B, Fv, Da)
            if self.sync_proj is not None and heard is not None:
                v = v + self.sync_proj(heard)[:, :, None]                            # (B, Fv, N, D)
            frames = v + self.kind_emb.weight[_VISION]
            parts.append(frames.reshape(B, Fv * N, -1))
            masks.append(s.frame_mask[:, :, None].expand(B, Fv, N).reshape(B, -1))
            times.append(vt.reshape(B, -1))
            kinds.append(torch.full((B, Fv * N), _VISION, dtype=torch.long, device=dev))
            cells.append(torch.arange(N, device=dev).repeat(Fv)[None].expand(B, -1))
        if parts:
            context, cmask = torch.cat(parts, 1), torch.cat(masks, 1)               # (B, S, D)
            ctimes, ckind, ccell = torch.cat(times, 1), torch.cat(kinds, 1), torch.cat(cells, 1)
        else:
            context = question.new_zeros(B, 0, c.d_model)
            cmask = torch.zeros(B, 0, dtype=torch.bool, device=dev)
            ctimes, ckind, ccell = (torch.zeros(B, 0, device=dev), cmask.long(), cmask.long())
        if isinstance(self.aggregator, MeanPoolClues):
            agg: AggregatorOutput = self.aggregator(question, qmask, context, cmask, ccell)
        else:
            agg = self.aggregator(question, qmask, context, cmask)
        clues, cells = agg.clues, None
        if self.pooled is not None:
            pmask = cmask
            if c.pooled_frame == "last" and parts:  # cells as the latest frame shows them: the
                # question is asked over the current scene, while the 6 s context often still
                # holds the previous scene's last second or two, which a mean over time mixes in
                t_last = ctimes.masked_fill(~cmask | (ckind != _VISION), float("-inf")).amax(1)  # (B,)
                pmask = cmask & ((ckind != _VISION) | (ctimes >= t_last[:, None]))
            pooled = self.pooled(question, qmask, context, pmask, ccell).clues          # (B, N+1, D)
            extra = 0.0                                                                 # (B, N, D) added to the cells
            if self.cell_query is not None and frames is not None:
                extra = extra + self.cell_query(q_mean, frames, s.frame_mask)
            if self.sound_cells is not None and heard is not None:
                extra = extra + self.sound_cells(s.frames, heard, s.frame_mask)
            if torch.is_tensor(extra):
                pooled = torch.cat([pooled[:, :-1] + extra, pooled[:, -1:]], 1)
            clues = torch.cat([clues, pooled], 1)
            cells = pooled[:, :-1]                                                      # (B, N, D)
        Nc = clues.shape[1]
        assert Nc == c.n_prefix_clues, (Nc, c.n_prefix_clues)
        embeds = torch.cat([clues, question], 1)                                    # (B, Nc+Tq', D)
        start = None
        if self.q_query is not None:
            read = clues if c.query_clues == "all" else clues[:, -1:]                 # (B, Nc|1, D)
            start = (self.embed.weight[self.layout.assistant] + self.q_query(q_mean)
                     + self.c_query(self.c_norm(read).flatten(1)))                    # (B, D)
            if self.readout is not None:
                start = start + self.readout(q_mean, clues)                          # (B, D)
        return Prefix(embeds, Nc + qlen, agg.attn, ctimes, ckind, start, cells)

    # --- heads ----------------------------------------------------------------------------
    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.embed.weight[: self.layout.n_text].T                        # (…, n_text)

    def audio_logits(self, h: torch.Tensor, codebook: torch.Tensor | int | None = None) -> torch.Tensor:
        """(…, D) -> (…, 1 + n_q*bins) scores for [EOA, codes]; masked to `codebook` if given."""
        logits = h @ self.embed.weight[self.layout.eoa:].T
        if codebook is not None:
            allowed = self.layout.audio_mask(logits.device)[codebook]
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits

    def codebook_of(self, token: torch.Tensor) -> torch.Tensor:
        """Codebook index of audio-phase token ids (EOA counts as codebook 0)."""
        a = (token - self.layout.audio_base).clamp(min=0) // self.layout.bins
        return torch.where(token == self.layout.eoa, torch.zeros_like(a), a).clamp(max=self.layout.n_q - 1)

    # --- training -------------------------------------------------------------------------
    def pack(self, prefix: Prefix, reply: torch.Tensor, reply_len: torch.Tensor):
        """Packs [prefix_b][reply_b] contiguously per item (no padding in the middle, so positions
        match generation), right-padded. Returns embeds (B, L, D), key mask, targets (B, L)."""
        B = reply.shape[0]
        P, R = prefix.length.tolist(), reply_len.tolist()
        L = max(p + r for p, r in zip(P, R))
        D = prefix.embeds.shape[-1]
        tok_emb = self.embed(reply.clamp(min=0))                                    # (B, R, D)
        if prefix.start is not None:  # reply[:, 0] is ASSISTANT
            tok_emb = torch.cat([prefix.start[:, None].to(tok_emb.dtype), tok_emb[:, 1:]], 1)
        embeds = prefix.embeds.new_zeros(B, L, D)
        targets = torch.full((B, L), IGNORE, dtype=torch.long, device=reply.device)
        mask = torch.zeros(B, L, dtype=torch.bool, device=reply.device)
        for b in range(B):
            p, r = P[b], R[b]
            embeds[b, :p] = prefix.embeds[b, :p]
            embeds[b, p:p + r] = tok_emb[b, :r]
            targets[b, p:p + r - 1] = reply[b, 1:r]
            mask[b, :p + r] = True
        return embeds, mask, targets

    def forward(self, s: SceneFeatures, reply: torch.Tensor, reply_len: torch.Tensor,
                mctp: bool = True, text_on: torch.Tensor | None = None) -> Losses:
        """reply (B, R) token ids `ASSISTANT text EOT audio EOA`, padded; reply_len (B,);
        text_on (B,) bool: whose text tokens count in the loss (None: all)."""
        prefix = self.prefix(s)
        x, key_mask, targets = self.pack(prefix, reply, reply_len)
        if text_on is not None:                 # those replies train their audio alone
            off = ~text_on.to(targets.device)[:, None] & (targets != IGNORE) & (targets < self.layout.eoa)
            targets = targets.masked_fill(off, IGNORE)
        h = self.backbone(x, 0, None, key_mask)                                     # (B, L, D)
        text_loss, audio_loss, n_text, n_audio = self._head_losses(h, targets)
        mctp_losses = []
        if mctp and len(self.mctp):
            for k, hk in enumerate(self.mctp.forward_train(h, x, key_mask), start=1):
                mctp_losses.append(self._head_losses(hk, targets[:, k:], audio_only=True)[1])
        total = text_loss + audio_loss + sum(mctp_losses)
        return Losses(total, text_loss, audio_loss, mctp_losses, n_text, n_audio, prefix.cells)

    def _head_losses(self, h, targets, audio_only: bool = False):
        valid = targets != IGNORE
        is_audio = valid & (targets >= self.layout.eoa)
        zero = h.sum() * 0.0
        text_loss = zero
        is_text = valid & ~is_audio
        if not audio_only and bool(is_text.any()):
            text_loss = F.cross_entropy(self.text_logits(h[is_text]), targets[is_text])
        audio_loss = zero
        if bool(is_audio.any()):
            t = targets[is_audio]
            logits = self.audio_logits(h[is_audio], self.codebook_of(t))
            audio_loss = F.cross_entropy(logits, t - self.layout.eoa)
        return text_loss, audio_loss, int(is_text.sum()), int(is_audio.sum())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init(m: nn.Module):
    # a frozen pretrained encoder's weights are buffers (speech/pretrained_audio.py): kept
    if isinstance(m, nn.Linear) and isinstance(m.weight, nn.Parameter):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
