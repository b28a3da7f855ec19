"""Streaming decoding of a causal EnCodec SEANet decoder, chunk by chunk.

The decoder (an `nn.Sequential` of SConv1d, SLSTM, activations, SConvTranspose1d and SEANet
residual blocks) is mirrored by a tree of stream nodes that call the very same torch modules and
carry, between chunks, exactly what the offline forward would have seen:

- causal SConv1d (stride 1): the last (kernel - 1) * dilation input samples (its left context;
  zero at the start of a stream, like the offline zero padding);
- causal SConvTranspose1d: the last (kernel - stride) output samples, which offline are
  overlap-added with the next frames' contributions (offline trims them on the right);
- SLSTM: the (h, c) state of every layer.

All state tensors are allocated once (fixed shapes), so memory does not grow with stream length,
and `decode` of any chunking equals `Codec.decode` of the whole sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from encodec.modules import SConv1d, SConvTranspose1d, SLSTM
from encodec.modules.seanet import SEANetResnetBlock

PAD_MODE = "constant"                                # zero padding: strictly causal


def is_causal(decoder: torch.nn.Module) -> bool:
    """True when every padded convolution of an encodec SEANet module is causal."""
    flags = [m.causal for m in decoder.modules() if hasattr(m, "causal")]
    return bool(flags) and all(flags)


class _Node:
    """One streamed module: `step` maps a (B, C, T) chunk to its (B, C', T * up) output."""

    def step(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def states(self) -> list[Tensor]:
        return []

    def reset(self) -> None:
        for s in self.states():
            s.zero_()


class _Pointwise(_Node):
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def step(self, x: Tensor) -> Tensor:
        return self.module(x)


class _Seq(_Node):
    def __init__(self, nodes: list[_Node]) -> None:
        self.nodes = nodes

    def step(self, x: Tensor) -> Tensor:
        for node in self.nodes:
            x = node.step(x)
        return x

    def states(self) -> list[Tensor]:
        return [s for node in self.nodes for s in node.states()]


class _Residual(_Node):
    def __init__(self, shortcut: _Node, block: _Node) -> None:
        self.shortcut, self.block = shortcut, block

    def step(self, x: Tensor) -> Tensor:
        return self.shortcut.step(x) + self.block.step(x)

    def states(self) -> list[Tensor]:
        return self.shortcut.states() + self.block.states()


class _Conv(_Node):
    """Causal stride-1 SConv1d: keeps the last (kernel - 1) * dilation input samples."""

    def __init__(self, module: SConv1d, batch: int, like: Tensor) -> None:
        conv = module.conv.conv
        kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        if stride != 1:
            raise ValueError(f"streaming supports stride-1 decoder convolutions, got stride "
                             f"{stride}")
        if module.pad_mode != PAD_MODE:
            raise ValueError(f"streaming needs zero ('{PAD_MODE}') causal padding, got "
                             f"pad_mode={module.pad_mode!r}; wrap the model in a Codec")
        self.module = module
        self.context = (kernel - 1) * dilation
        self.buf = like.new_zeros(batch, conv.in_channels, self.context)  # (B, C_in, ctx)

    def step(self, x: Tensor) -> Tensor:
        if self.context == 0:
            return self.module.conv(x)
        x = torch.cat([self.buf, x], dim=-1)          # (B, C_in, ctx + T)
        self.buf.copy_(x[..., -self.context:])
        return self.module.conv(x)                     # (B, C_out, T): NormConv1d, no padding

    def states(self) -> list[Tensor]:
        return [self.buf]


class _ConvTranspose(_Node):
    """Causal SConvTranspose1d: keeps the (kernel - stride) samples still being overlap-added."""

    def __init__(self, module: SConvTranspose1d, batch: int, like: Tensor) -> None:
        convtr = module.convtr.convtr
        if module.trim_right_ratio != 1.0:
            raise ValueError("streaming needs transposed convolutions trimmed fully on the "
                             f"right (trim_right_ratio=1), got {module.trim_right_ratio}")
        if not isinstance(module.convtr.norm, nn.Identity):
            raise ValueError("streaming cannot carry a normalisation layer after a transposed "
                             f"convolution ({type(module.convtr.norm).__name__})")
        self.module = module
        self.stride = convtr.stride[0]
        self.overlap = convtr.kernel_size[0] - self.stride
        assert self.overlap >= 0, (convtr.kernel_size, convtr.stride)
        self.bias = convtr.bias
        self.tail = like.new_zeros(batch, convtr.out_channels, self.overlap)  # (B, C_out, ov)

    def step(self, x: Tensor) -> Tensor:
        y = self.module.convtr(x)                      # (B, C_out, T * stride + overlap)
        n = x.shape[-1] * self.stride
        if self.overlap == 0:
            return y
        y[..., :self.overlap] += self.tail
        self.tail.copy_(y[..., n:])
        if self.bias is not None:                      # each chunk adds the bias once itself
            self.tail.sub_(self.bias[:, None])
        return y[..., :n]                              # (B, C_out, T * stride)

    def states(self) -> list[Tensor]:
        return [self.tail]


class _LSTM(_Node):
    def __init__(self, module: SLSTM, batch: int, like: Tensor) -> None:
        lstm = module.lstm
        if lstm.bidirectional or not isinstance(lstm, nn.LSTM) or lstm.batch_first:
            raise ValueError("streaming supports a unidirectional, time-first SLSTM only")
        self.module = module
        shape = (lstm.num_layers, batch, lstm.hidden_size)
        self.h = like.new_zeros(shape)                 # (L, B, D)
        self.c = like.new_zeros(shape)                 # (L, B, D)

    def step(self, x: Tensor) -> Tensor:
        x = x.permute(2, 0, 1)                         # (T, B, D)
        y, (h, c) = self.module.lstm(x, (self.h, self.c))
        self.h.copy_(h)
        self.c.copy_(c)
        if self.module.skip:
            y = y + x
        return y.permute(1, 2, 0)                      # (B, D, T)

    def states(self) -> list[Tensor]:
        return [self.h, self.c]


POINTWISE = (nn.ELU, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity,
             nn.PReLU, nn.Softsign, nn.Hardtanh)


def _compile(module: nn.Module, batch: int, like: Tensor) -> _Node:
    if isinstance(module, nn.Sequential):
        return _Seq([_compile(m, batch, like) for m in module])
    if isinstance(module, SConv1d):
        return _Conv(module, batch, like)
    if isinstance(module, SConvTranspose1d):
        return _ConvTranspose(module, batch, like)
    if isinstance(module, SLSTM):
        return _LSTM(module, batch, like)
    if isinstance(module, SEANetResnetBlock):
        return _Residual(_compile(module.shortcut, batch, like),
                         _compile(module.block, batch, like))
    if isinstance(module, POINTWISE):
        return _Pointwise(module)
    raise ValueError(f"cannot stream decoder module {type(module).__name__}")


class StreamingDecoder:
    """Decodes (B, n_q, f) codes chunk by chunk into (B, channels, f * hop_length) audio.

    Uses the codec's own decoder modules (no copied weights); the concatenated output of any
    chunking equals `codec.decode` of the whole sequence. Causal codecs only.
    """

    def __init__(self, codec, batch: int = 1) -> None:  # codec: a speech.codec.Codec
        model = codec.model
        if not is_causal(model.decoder):
            raise ValueError(f"codec {codec.name!r} is not causal: streaming decoding needs a "
                             "codec built with causal=True; decode it offline with "
                             "Codec.decode instead")
        if model.normalize or model.segment is not None:
            raise ValueError(f"codec {codec.name!r} uses audio normalisation or segments "
                             f"(normalize={model.normalize}, segment={model.segment}), which "
                             "cannot be decoded in a stream")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        self.codec = codec
        self.batch = batch
        like = next(model.decoder.parameters()).detach()
        self._root = _compile(model.decoder.model, batch, like)
        self.frames = 0  # frames decoded since the last reset

    def reset(self) -> None:
        """Start a new stream (zero state, as at the start of an offline decode)."""
        self._root.reset()
        self.frames = 0

    def state_numel(self) -> int:
        """Total number of elements held as state (constant for the decoder's lifetime)."""
        return sum(s.numel() for s in self._root.states())

    def decode(self, codes: Tensor) -> Tensor:
        """(B, n_q, f) codes, f >= 1 -> (B, channels, f * hop_length) audio that continues the
        stream."""
        self.codec.check_codes(codes)
        if codes.shape[0] != self.batch:
            raise ValueError(f"this StreamingDecoder was made for batch {self.batch}, got codes "
                             f"shaped {tuple(codes.shape)}")
        with torch.no_grad():
            emb = self.codec.model.quantizer.decode(codes.long().transpose(0, 1))  # (B, D, f)
            out = self._root.step(emb)                                     # (B, C, f * hop)
        assert out.shape[-1] == codes.shape[-1] * self.codec.hop_length, (
            out.shape, codes.shape, self.codec.hop_length)
        self.frames += codes.shape[-1]
        return out
