"""Neural audio codec: the `encodec` package's EncodecModel used at a fixed number of codebooks.

Two kinds of codec: a project codec built from a `CodecConfig` (SEANet encoder/decoder + residual
VQ from `encodec`, saved as `codec.safetensors` + `codec.json`), or the pretrained causal 24 kHz
EnCodec loaded by name ("encodec_24khz"). Both are wrapped in `Codec`, which turns (B, 1, T)
audio into (B, n_q, F) codes and back, and makes a `StreamingDecoder` (speech/streaming_codec.py).

Causal padding: EnCodec's SConv1d pads causal convolutions on the left by *reflection* by default,
which makes the first few output samples depend on later input. `Codec` switches the decoder's
convolutions of a causal model to zero padding, so that `Codec.decode` is strictly causal and
streaming decoding reproduces it exactly (for the pretrained model this changes only the onset of
a stream; project codecs are built, and trained, with zero padding throughout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from encodec import EncodecModel
from encodec.modules import SConv1d
from encodec.modules.seanet import SEANetDecoder, SEANetEncoder
from encodec.quantization import ResidualVectorQuantizer

from speech.streaming_codec import PAD_MODE, StreamingDecoder, is_causal  # noqa: F401 (re-exported)


CODEC_FORMAT = "tandem-codec"
CODEC_VERSION = 1
WEIGHTS_FILE = "codec.safetensors"
CONFIG_FILE = "codec.json"
PRETRAINED_24KHZ = "encodec_24khz"
PRETRAINED_24KHZ_FILE = "encodec_24khz-d7cc33bc.th"  # the file encodec's loader downloads
PRETRAINED_24KHZ_BANDWIDTH = 6.0                     # kbps -> 8 codebooks at 75 Hz
STREAMABLE_NORMS = ("weight_norm", "spectral_norm", "none")


@dataclass(frozen=True)
class CodecConfig:
    """Architecture of a project codec (SEANet encoder/decoder + residual VQ from `encodec`)."""

    sample_rate: int = 16000
    channels: int = 1
    n_filters: int = 32
    dimension: int = 128
    ratios: tuple[int, ...] = (8, 5, 4, 2)
    n_residual_layers: int = 1
    lstm: int = 2
    n_q: int = 4              # codebooks used (fixed bandwidth)
    bins: int = 1024          # codebook size
    causal: bool = True
    norm: str = "weight_norm"

    def __post_init__(self) -> None:
        if isinstance(self.ratios, list):  # from JSON
            object.__setattr__(self, "ratios", tuple(self.ratios))
        minimum = {"sample_rate": 1, "channels": 1, "n_filters": 1, "dimension": 1,
                   "n_residual_layers": 0, "lstm": 0, "n_q": 1, "bins": 2}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"CodecConfig.{name} must be an int >= {low}, got {value!r}")
        if self.channels > 2:
            raise ValueError(f"CodecConfig.channels must be 1 (mono) or 2, got {self.channels}")
        if (not isinstance(self.ratios, tuple) or not self.ratios
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                           for r in self.ratios)):
            raise ValueError("CodecConfig.ratios must be a non-empty tuple of ints >= 1 "
                             f"(upsampling ratios of the decoder), got {self.ratios!r}")
        if self.bins & (self.bins - 1):
            raise ValueError(f"CodecConfig.bins must be a power of 2 >= 2 (EnCodec stores "
                             f"log2(bins) bits per code), got {self.bins}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"CodecConfig.causal must be a bool, got {self.causal!r}")
        if self.norm not in STREAMABLE_NORMS:
            raise ValueError(f"CodecConfig.norm must be one of {STREAMABLE_NORMS} (per-layer "
                             f"reparametrisations that keep the codec streamable), "
                             f"got {self.norm!r}")

    @property
    def hop_length(self) -> int:
        """Audio samples per codec frame (product of the ratios)."""
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> float:
        """Codec frames per second."""
        return self.sample_rate / self.hop_length

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ratios"] = list(self.ratios)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a codec config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown codec config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


CODEC_PRESETS: dict[str, CodecConfig] = {
    # Tests: builds in milliseconds, random weights.
    "tiny": CodecConfig(n_filters=4, dimension=16, lstm=1, bins=64, n_q=4),
    # Shipped 16 kHz speech codec: 25 Hz frames, 4 codebooks of 256 (800 bps). Sized for
    # ~20 min of CPU training (fusion/train_codec.py): at equal steps 25 Hz reconstructed
    # held-out speech better than 50 Hz (mel distance 0.60 vs 0.72) and trained 1.4x faster.
    "demo": CodecConfig(n_filters=16, dimension=128, ratios=(8, 5, 4, 4), lstm=1, bins=256,
                        n_q=4),
    # The agent's Piper voice (DEMO_WORLD.md version 2; round 12's): 25 Hz, 8 codebooks of 1024
    # (2 kbps). At 25 min on 2 CPU cores it kept held-out sentences' DNSMOS at 2.90 vs 2.61 for
    # 50 Hz x 6 x 1024, with two thirds of the tokens per second of reply; shipped after 40 min:
    # mel distance 0.252, the 50 replies heard word for word 92% (94% as spoken).
    "speech25x8": CodecConfig(n_filters=16, dimension=128, ratios=(8, 5, 4, 4), lstm=1,
                              bins=1024, n_q=8),
}


@dataclass(frozen=True)
class CodecSpec:
    """What a model trained on codec tokens records about its codec (JSON-serialisable)."""

    name: str
    sample_rate: int
    frame_rate: float
    n_q: int
    bins: int
    fingerprint: str  # first 16 hex chars of sha256 over the codec's state dict

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecSpec:
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != set(fields):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"a codec spec needs exactly the keys {sorted(fields)}, got {got}")
        try:
            return cls(name=str(data["name"]), sample_rate=int(data["sample_rate"]),
                       frame_rate=float(data["frame_rate"]), n_q=int(data["n_q"]),
                       bins=int(data["bins"]), fingerprint=str(data["fingerprint"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"malformed codec spec {data!r}: {e}") from e


def state_fingerprint(module: torch.nn.Module) -> str:
    """First 16 hex chars of sha256 over a module's state dict (names sorted; name, dtype,
    shape and raw bytes of every tensor)."""
    from speech.fingerprint import weights_fingerprint
    return weights_fingerprint(module.state_dict())


def code_weights(model: torch.nn.Module) -> dict[str, Tensor]:
    """The weights of an EncodecModel that decide which codes audio gets: its encoder and
    quantizer (the decoder only says how codes sound)."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "quantizer."))}


class Codec:
    """An `encodec.EncodecModel` used at a fixed number of codebooks `n_q`.

    Wrapping a causal model switches its decoder's convolutions to zero (causal) padding, in
    place. Codes are (B, n_q, F) int64 in [0, bins); audio is (B, channels, T) float.
    """

    def __init__(self, model: EncodecModel, n_q: int | None = None, *, name: str = "codec",
                 config: CodecConfig | None = None) -> None:
        if not isinstance(model, EncodecModel):
            raise TypeError(f"Codec wraps an encodec.EncodecModel, got {type(model).__name__}")
        if model.normalize or model.segment is not None:
            raise ValueError(
                f"codec {name!r} uses EnCodec's audio normalisation or segmented overlap-add "
                f"(normalize={model.normalize}, segment={model.segment}); its codes need a "
                "per-segment scale that Tandem's codes cannot carry: use a model built with "
                "normalize=False and segment=None (the pretrained 24 kHz model is such a model)")
        n_q = model.quantizer.n_q if n_q is None else n_q
        if not 1 <= n_q <= model.quantizer.n_q:
            raise ValueError(f"n_q must be in [1, {model.quantizer.n_q}] for codec {name!r}, "
                             f"got {n_q}")
        self.model = model
        self.config = config
        self.name = name
        self._n_q = n_q
        self._spec_cache: tuple[tuple, CodecSpec] | None = None
        if is_causal(model.decoder):
            for m in model.decoder.modules():
                if isinstance(m, SConv1d):
                    m.pad_mode = PAD_MODE

    # --- properties ---------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return int(self.model.sample_rate)

    @property
    def channels(self) -> int:
        return int(self.model.channels)

    @property
    def hop_length(self) -> int:
        return math.prod(int(r) for r in self.model.decoder.ratios)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def n_q(self) -> int:
        return self._n_q

    @property
    def bins(self) -> int:
        return int(self.model.quantizer.bins)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def spec(self) -> CodecSpec:
        """The codec's identity; recomputed when any weight changed (in-place updates included)."""
        state = self.model.state_dict(keep_vars=True)
        key = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
        if self._spec_cache is None or self._spec_cache[0] != key:
            spec = CodecSpec(name=self.name, sample_rate=self.sample_rate,
                             frame_rate=self.frame_rate, n_q=self.n_q, bins=self.bins,
                             fingerprint=state_fingerprint(self.model))
            self._spec_cache = (key, spec)
        return self._spec_cache[1]

    # --- coding -------------------------------------------------------------------------
    def encode(self, wav: Tensor) -> Tensor:
        """(B, channels, T) float audio at `sample_rate` -> (B, n_q, F) int64 codes,
        F = ceil(T / hop_length)."""
        if not isinstance(wav, Tensor):
            raise ValueError(f"encode takes a torch.Tensor, got {type(wav).__name__}")
        if wav.dim() != 3:
            raise ValueError(f"encode takes audio shaped (batch, channels, samples), got shape "
                             f"{tuple(wav.shape)}; add dimensions with wav.view(1, 1, -1)")
        if wav.shape[1] != self.channels:
            raise ValueError(f"codec {self.name!r} takes {self.channels}-channel audio, got "
                             f"{wav.shape[1]} channels (shape {tuple(wav.shape)}); "
                             + ("mix down with wav.mean(dim=1, keepdim=True)"
                                if self.channels == 1 else "give it stereo audio"))
        if wav.shape[-1] < 1 or wav.shape[0] < 1:
            raise ValueError(f"encode needs at least one sample, got shape {tuple(wav.shape)}")
        if not wav.is_floating_point():
            raise ValueError(f"encode takes float audio in [-1, 1], got dtype {wav.dtype}; "
                             "convert PCM16 with wav.float() / 32768")
        if wav.device != self.device:
            raise ValueError(f"audio is on {wav.device} but the codec is on {self.device}")
        wav = wav.to(next(self.model.parameters()).dtype)
        with torch.no_grad():
            emb = self.model.encoder(wav)                              # (B, D, F)
            codes = self.model.quantizer.vq.encode(emb, n_q=self.n_q)  # (n_q, B, F)
        return codes.transpose(0, 1).contiguous().long()               # (B, n_q, F)

    def check_codes(self, codes: Tensor) -> None:
        """Raise ValueError unless `codes` is a (B, n_q, F>=1) integer tensor in [0, bins)."""
        if not isinstance(codes, Tensor):
            raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dim() != 3 or codes.shape[1] != self.n_q or codes.shape[0] < 1:
            raise ValueError(f"codes must be shaped (batch, n_q={self.n_q}, frames), got "
                             f"{tuple(codes.shape)}")
        if codes.shape[2] < 1:
            raise ValueError("codes must hold at least one frame")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.bins:
            raise ValueError(f"codes must lie in [0, {self.bins}), got values in [{lo}, {hi}]")

    def decode(self, codes: Tensor) -> Tensor:
        """(B, n_q, F) codes -> (B, channels, F * hop_length) float audio."""
        self.check_codes(codes)
        with torch.no_grad():
            emb = self.model.quantizer.decode(codes.long().transpose(0, 1))  # (B, D, F)
            return self.model.decoder(emb)                                  # (B, C, F*hop)

    def streaming_decoder(self, batch: int = 1) -> StreamingDecoder:
        """A decoder that takes codes chunk by chunk (causal codecs only)."""
        return StreamingDecoder(self, batch=batch)

    def to(self, device: torch.device | str) -> Codec:
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        return (f"Codec({self.name!r}, {self.sample_rate} Hz, {self.frame_rate:g} frames/s, "
                f"n_q={self.n_q}, bins={self.bins})")


@contextlib.contextmanager
def quiet_weight_norm():
    """Builds encodec's layers without torch's FutureWarning about `torch.nn.utils.weight_norm`
    (encodec's call, not ours; the weights load the same)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.nn\.utils\.weight_norm.* is deprecated",
                                category=FutureWarning)
        yield


def build_model(config: CodecConfig, name: str = "unset") -> EncodecModel:
    """A randomly initialised EncodecModel for a project codec config."""
    common = dict(channels=config.channels, dimension=config.dimension,
                  n_filters=config.n_filters, n_residual_layers=config.n_residual_layers,
                  ratios=list(config.ratios), norm=config.norm, causal=config.causal,
                  pad_mode=PAD_MODE, lstm=config.lstm)
    with quiet_weight_norm():
        encoder = SEANetEncoder(**common)
        decoder = SEANetDecoder(**common)
    # Random codebooks (no k-means on the first batch): a fresh codec already maps different
    # codes to different audio; training replaces dead codes from the batch.
    quantizer = ResidualVectorQuantizer(dimension=config.dimension, n_q=config.n_q,
                                        bins=config.bins, kmeans_init=False)
    bandwidth = config.n_q * math.log2(config.bins) * config.frame_rate / 1000
    model = EncodecModel(encoder, decoder, quantizer, [bandwidth], config.sample_rate,
                         config.channels, normalize=False, segment=None, name=name)
    return model.eval()


def build_codec(config: CodecConfig | str) -> Codec:
    """A randomly initialised project codec from a config or a preset name."""
    name = "custom"
    if isinstance(config, str):
        if config not in CODEC_PRESETS:
            raise ValueError(f"unknown codec preset {config!r}; presets: {sorted(CODEC_PRESETS)}")
        name, config = config, CODEC_PRESETS[config]
    if not isinstance(config, CodecConfig):
        raise TypeError(f"build_codec takes a CodecConfig or a preset name, got {config!r}")
    name = next((k for k, v in CODEC_PRESETS.items() if v == config), name)
    return Codec(build_model(config, name), config.n_q, name=name, config=config)


def _load_pretrained_24khz(bandwidth: float) -> Codec:
    target = [1.5, 3.0, 6.0, 12.0, 24.0]
    if bandwidth not in target:
        raise ValueError(f"encodec_24khz supports bandwidths {target} kbps, got {bandwidth}")
    try:
        with quiet_weight_norm():
            model = EncodecModel.encodec_model_24khz(pretrained=True)
    except Exception as e:  # URLError / socket errors (no network), bad hash, bad cache file
        cache = Path(torch.hub.get_dir()) / "checkpoints" / PRETRAINED_24KHZ_FILE
        raise RuntimeError(
            f"could not load the pretrained EnCodec 24 kHz weights ({type(e).__name__}: {e}). "
            f"encodec downloads them on first use, which needs network access (no network "
            f"here?); a half-written or corrupt cached file must be deleted. Pre-download on a "
            f"connected "
            f"machine: python -c \"from encodec import EncodecModel; "
            f"EncodecModel.encodec_model_24khz()\", then copy {PRETRAINED_24KHZ_FILE} into "
            f"the torch hub cache here: {cache} (or point TORCH_HOME at a copied cache)") from e
    n_q = model.quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, bandwidth)
    return Codec(model, n_q, name=PRETRAINED_24KHZ)


def _codec_dir(path: Path) -> Path:
    return path.parent if path.suffix in (".safetensors", ".json") else path


def load_codec(name_or_path: str | Path, device: torch.device | str = "cpu",
               bandwidth: float | None = None) -> Codec:
    """Load "encodec_24khz" (pretrained, 8 codebooks at 6 kbps unless `bandwidth` says
    otherwise) or a project codec directory holding codec.safetensors + codec.json."""
    if str(name_or_path) == PRETRAINED_24KHZ:
        bw = PRETRAINED_24KHZ_BANDWIDTH if bandwidth is None else float(bandwidth)
        return _load_pretrained_24khz(bw).to(device)
    if bandwidth is not None:
        raise ValueError("bandwidth applies only to the pretrained 'encodec_24khz'; a project "
                         "codec uses the n_q stored in its config")
    folder = _codec_dir(Path(name_or_path))
    for file in (folder / CONFIG_FILE, folder / WEIGHTS_FILE):
        if not file.is_file():
            raise FileNotFoundError(
                f"no codec at {file}: expected a directory with {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}; make one with `python run.py train codec` (or save_codec), "
                f"or use the pretrained '{PRETRAINED_24KHZ}'")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"codec config {folder / CONFIG_FILE} is corrupt ({e}); re-save the "
                         "codec or retrain it with `python run.py train codec`") from e
    if not isinstance(meta, dict) or meta.get("format") != CODEC_FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE} is not a Tandem codec config (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {CODEC_FORMAT!r})")
    if meta.get("version") != CODEC_VERSION:
        raise ValueError(f"{folder / CONFIG_FILE} has codec format version "
                         f"{meta.get('version')!r}; this Tandem reads version {CODEC_VERSION}")
    config = CodecConfig.from_dict(meta.get("config"))
    name = str(meta.get("name") or folder.name)
    model = build_model(config, name)
    from safetensors.torch import load_file

    try:
        state = load_file(str(folder / WEIGHTS_FILE))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # SafetensorError (garbage), RuntimeError (keys / shapes)
        raise ValueError(f"codec weights {folder / WEIGHTS_FILE} are corrupt or do not match "
                         f"{CONFIG_FILE} ({str(e)[:300]}); re-save or retrain the codec with "
                         "`python run.py train codec`") from e
    return Codec(model.to(device).eval(), config.n_q, name=name, config=config)


def save_codec(codec: Codec, path: str | Path, half: bool = False) -> Path:
    """Write codec.safetensors + codec.json into directory `path`; returns the directory.
    `half` stores float tensors as fp16 (half the size) and first rounds the codec's own
    weights to those values, so its spec (fingerprint) is the one `load_codec` will report."""
    if codec.config is None:
        raise ValueError(f"only project codecs (built from a CodecConfig) can be saved; "
                         f"{codec.name!r} is loaded by name with load_codec({codec.name!r})")
    from safetensors.torch import save_file

    folder = _codec_dir(Path(path))
    folder.mkdir(parents=True, exist_ok=True)
    if half:
        with torch.no_grad():
            for t in codec.model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half())
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().to("cpu").contiguous()
             for k, v in codec.model.state_dict().items()}
    meta = {"format": CODEC_FORMAT, "version": CODEC_VERSION, "name": codec.name,
            "config": codec.config.to_dict(), "spec": codec.spec.to_dict()}
    # Write both next to their final names, then rename: a crash never leaves half a file.
    tmp_weights = folder / (WEIGHTS_FILE + ".tmp")
    tmp_config = folder / (CONFIG_FILE + ".tmp")
    save_file(state, str(tmp_weights), metadata={"format": CODEC_FORMAT})
    tmp_config.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_weights, folder / WEIGHTS_FILE)
    os.replace(tmp_config, folder / CONFIG_FILE)
    return folder
