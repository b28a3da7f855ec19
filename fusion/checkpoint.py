"""Checkpoints: one safetensors file whose header metadata holds the JSON FusionConfig, the
codec and the tokenizer the model was trained with. `load_model` is the one loader."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from speech.pretrained_audio import PretrainedAudioError

from .config import FusionConfig
from .model import FusionModel

FORMAT, VERSION = "tandem-fusion", 2     # 2: tensors may be stored as int8 rows (KEY.int8 + KEY.scale)
# The shipped file keeps its text + audio token embedding (60058 x 256) and the MCTP modules'
# matrices (one module per codebook after the first: 7 with 8 codebooks) as int8 rows with one
# scale each; every other tensor fp16. Each weight moves by at most half its row's step. Names:
# a tensor's key, or a prefix ending in "." for every matrix (2-D float tensor) under it.
# Round 11 (embedding only): 27 -> 13.7 MB, the test split's replies unchanged.
SHIPPED_INT8 = ("embed.weight", "mctp.")


def _int8(key: str, v: torch.Tensor, names: tuple[str, ...]) -> bool:
    """Whether `names` (SHIPPED_INT8's form) stores tensor `key` as int8 rows."""
    return v.dim() == 2 and v.is_floating_point() and any(
        key == n or (n.endswith(".") and key.startswith(n)) for n in names)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match the codec/tokenizer in use."""


def pick_device(device: str | None = None) -> torch.device:
    """`None`/"auto": CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    return torch.device(device)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w ~ q * scale[:, None]."""
    assert w.dim() == 2 and w.is_floating_point(), (w.shape, w.dtype)
    scale = w.float().abs().amax(dim=1).clamp_min(1e-12) / 127.0       # (R,)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def save_model(model: FusionModel, path: str | Path, half: bool = False, extra: dict | None = None,
               int8: tuple[str, ...] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        if _int8(k, v, int8):
            state[k + ".int8"], state[k + ".scale"] = quantize_rows(v)
        else:
            state[k] = (v.half() if half and v.is_floating_point() else v).contiguous()
    meta = {"format": FORMAT, "version": str(VERSION if int8 else 1), "config": model.config.to_json(),
            "extra": json.dumps(extra or {})}
    return _write(state, path, meta)


def _write(state: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> Path:
    from safetensors.torch import save_file
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a crash mid-save never leaves a half checkpoint
    return path


def read_header(path: str | Path) -> tuple[FusionConfig, dict]:
    """Config and extra metadata of a checkpoint, without loading the weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fusion checkpoint at {path}: train one with "
                                "`python run.py train fusion` or pass --model PATH")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for garbage
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (corrupt or "
                              f"truncated?): {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Tandem fusion checkpoint (format={meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} has format version {meta['version']}; this Tandem reads "
                              f"up to {VERSION}: update Tandem")
    return FusionConfig.from_json(meta["config"]), json.loads(meta.get("extra", "{}"))


def check_compatible(config: FusionConfig, codec=None) -> None:
    """Refuses a codec or tokenizer other than the ones the model was trained with."""
    from .tokens import get_tokenizer
    tok = get_tokenizer(config.tokenizer)
    if tok.encoding.n_vocab != config.n_text:
        raise CheckpointError(f"tokenizer mismatch: the model was trained with {config.tokenizer} of "
                              f"{config.n_text} tokens, this one has {tok.encoding.n_vocab}")
    if codec is not None and codec.spec.fingerprint != config.codec.fingerprint:
        raise CheckpointError(
            f"codec mismatch: the model was trained with codec {config.codec.name!r} "
            f"(fingerprint {config.codec.fingerprint}, {config.codec.n_q}x{config.codec.bins} codes at "
            f"{config.codec.sample_rate} Hz), but {codec.spec.name!r} (fingerprint "
            f"{codec.spec.fingerprint}) was given; use the codec the model was trained with")


def load_model(path: str | Path, device: str | None = None, codec=None, dtype=None) -> FusionModel:
    """Loads a fusion checkpoint; refuses a codec/tokenizer mismatch, or pretrained audio-encoder
    weights (loaded from their package, not the file) other than the trained ones, clearly."""
    from safetensors.torch import load_file
    config, _ = read_header(path)
    check_compatible(config, codec)
    dev = pick_device(device)
    try:
        model = FusionModel(config)
    except PretrainedAudioError as e:  # the pretrained audio encoder's package or fingerprint
        raise CheckpointError(f"{path}: {e}") from e
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: could not read weights (corrupt or truncated?): {e}") from e
    for k in [k for k in state if k.endswith(".int8")]:               # int8 rows -> float
        base = k[:-len(".int8")]
        state[base] = state.pop(k).float() * state.pop(base + ".scale").float()[:, None]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    model.eval().to(dev)
    if dtype is None and dev.type == "cuda":
        dtype = torch.float16  # half precision on GPU
    if dtype is not None:
        model.to(dtype)
    return model


def load_with_codec(path: str | Path, device: str | None = None, codec_path: str | Path | None = None):
    """Loads a fusion checkpoint together with the codec it was trained with: the codec named in
    its config (resolved next to the checkpoint, then the codec directory it was trained against,
    then the shipped assets/codec, then as given), or `codec_path`."""
    from speech.codec import load_codec
    dev = pick_device(device)
    codec = load_codec(codec_location(path, codec_path), device=dev)
    model = load_model(path, device=str(dev), codec=codec)
    return model, codec


def codec_location(path: str | Path, codec_path: str | Path | None = None) -> str:
    """Where `load_with_codec` takes the codec of the fusion checkpoint PATH from."""
    config, extra = read_header(path)
    where = codec_path
    if where is None:
        name = config.codec.name  # a preset name ("demo") unless the codec was renamed
        here = Path(path).parent
        # beside the checkpoint: under its name, or `codec/` (assets/codec next to
        # assets/fusion.safetensors, as `run.py train all` lays them out); then the codec
        # directory it was trained against (a run directory's model) and the shipped one
        # (those two only when their fingerprint matches)
        want = config.codec.fingerprint
        trained = ((extra or {}).get("options") or {}).get("codec")
        known = [Path(trained)] if isinstance(trained, str) and trained else []
        known.append(Path(__file__).resolve().parent.parent / "assets" / "codec")
        candidates = [p for p in (here / name, here / "codec")
                      if p.exists() and _codec_fingerprint(p) in (None, want)]
        candidates += [p for p in known if _codec_fingerprint(p) == want]
        where = str(candidates[0]) if candidates else name
    return str(where)


def _codec_fingerprint(folder: Path) -> str | None:
    """The fingerprint a saved project codec declares (None: not readable as one)."""
    try:
        return json.loads((folder / "codec.json").read_text())["spec"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def same_codes(a, b) -> bool:
    """Whether codecs `a` and `b` turn any audio into the same codes: equal configs, encoders
    and codebooks (their decoders may differ)."""
    from speech.codec import code_weights
    if a.config != b.config or a.n_q != b.n_q:
        return False
    wa, wb = code_weights(a.model), code_weights(b.model)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k].cpu(), wb[k].cpu()) for k in wa)


def rebind_codec(path: str | Path, new_codec, out: str | Path, old_codec=None) -> Path:
    """Write the fusion checkpoint PATH to OUT bound to `new_codec` (its config's codec spec
    replaced; every tensor byte-identical), after checking that `new_codec` makes the same codes
    as the codec PATH was trained with (`old_codec`, or the one `load_with_codec` finds): the
    way to ship a codec whose decoder alone was retrained (`lab.codec_gan`)."""
    import dataclasses

    from safetensors import safe_open
    from speech.codec import load_codec
    config, _ = read_header(path)
    old = old_codec if old_codec is not None else load_codec(codec_location(path))
    check_compatible(config, old)
    if not same_codes(old, new_codec):
        raise CheckpointError(
            f"codec {new_codec.spec.name!r} ({new_codec.spec.fingerprint}) does not make the same "
            f"codes as {old.spec.name!r} ({old.spec.fingerprint}), which {path} was trained with: "
            f"only a codec whose decoder alone was retrained can take its place; retrain the "
            f"model on the new codec instead (`python run.py train fusion --codec-dir ...`)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = dataclasses.replace(config, codec=new_codec.spec).to_json()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _write(state, out, meta)
