"""app.protocol: encode/decode round trips, every kind of bad input (the input resampler:
tests/test_resample.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from app import protocol as P
from app.protocol import Kind, ProtocolError, decode, encode

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 20 + b"\xff\xd9"


def real_jpeg() -> bytes:
    import cv2
    ok, buf = cv2.imencode(".jpg", np.full((24, 32, 3), 90, np.uint8))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("kind,payload,sender", [
    (Kind.HANDSHAKE, {"protocol": 1, "input_rate": 16000, "token": "s3cret"}, "client"),
    (Kind.HANDSHAKE, {"protocol": 1, "session": "ab12", "input_rate": 16000, "output_rate": 24000,
                      "model": "random-tiny"}, "server"),
    (Kind.EVENT, {"type": "control", "action": "interrupt"}, "client"),
    (Kind.EVENT, {"type": "reply_text", "text": "un café ☕", "turn": 3}, "server"),
    (Kind.ERROR, {"code": "busy", "message": "try later"}, "server"),
])
def test_json_round_trip(kind, payload, sender):
    msg = encode(kind, payload)
    assert msg[0] == kind
    json.loads(msg[1:].decode("utf-8"))                 # the payload is plain UTF-8 JSON
    assert decode(msg, sender) == (kind, payload)


def test_binary_round_trips():
    pcm = np.array([0, 1, -1, 32767, -32768, 1234], np.int16)
    msg = encode(Kind.AUDIO_IN, pcm)
    assert msg == b"\x01" + pcm.astype("<i2").tobytes()
    kind, body = decode(msg, "client")
    assert kind == Kind.AUDIO_IN and np.array_equal(np.frombuffer(body, "<i2"), pcm)
    assert decode(encode(Kind.AUDIO_OUT, pcm), "server") == (Kind.AUDIO_OUT, pcm.tobytes())
    jpeg = real_jpeg()
    assert decode(encode(Kind.VIDEO_IN, jpeg), "client") == (Kind.VIDEO_IN, jpeg)
    assert decode(bytearray(encode(Kind.AUDIO_IN, b"")), "client") == (Kind.AUDIO_IN, b"")


def test_encode_refuses_wrong_payload_types():
    with pytest.raises(TypeError):
        encode(Kind.EVENT, b"{}")
    with pytest.raises(TypeError):
        encode(Kind.AUDIO_OUT, np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        encode(9, b"")
    with pytest.raises(ValueError):                     # NaN is not JSON
        encode(Kind.EVENT, {"type": "metrics", "x": float("nan")})


@pytest.mark.parametrize("message,sender,code", [
    (b"", "client", P.BAD_MESSAGE),
    ("\x04{}", "client", P.BAD_MESSAGE),                # a text frame
    (b"\x07abc", "client", P.UNKNOWN_KIND),
    (b"\x06" + JPEG, "client", P.WRONG_DIRECTION),     # demo-scene video out from a client
    (b"\xff", "client", P.UNKNOWN_KIND),
    (b"\x03\x00\x00", "client", P.WRONG_DIRECTION),      # audio out from a client
    (b"\x05{}", "client", P.WRONG_DIRECTION),
    (b"\x01\x00\x00\x00", "server", P.WRONG_DIRECTION),  # audio in from a server
    (b"\x02" + JPEG, "server", P.WRONG_DIRECTION),
    (b"\x04{not json", "client", P.BAD_JSON),
    (b"\x04\xff\xfe", "client", P.BAD_JSON),             # not UTF-8
    (b"\x00[1, 2]", "client", P.BAD_JSON),               # JSON, but not an object
    (b"\x00", "client", P.BAD_JSON),                     # empty JSON payload
    (b"\x04{\"action\": \"reset\"}", "client", P.BAD_EVENT),  # no "type"
    (b"\x01\x00\x00\x00", "client", P.BAD_AUDIO),        # odd-length PCM
    (b"\x03\x00", "server", P.BAD_AUDIO),
    (b"\x02", "client", P.BAD_VIDEO),
    (b"\x02GIF89a...", "client", P.BAD_VIDEO),
    (b"\x02" + JPEG[:-2], "client", P.BAD_VIDEO),        # truncated: no end marker
])
def test_bad_messages(message, sender, code):
    with pytest.raises(ProtocolError) as e:
        decode(message, sender)
    assert e.value.code == code
    assert e.value.message and e.value.payload() == {"code": code, "message": e.value.message}


def test_per_kind_limits():
    limits = {**P.DEFAULT_LIMITS, Kind.AUDIO_IN: 8}
    assert decode(b"\x01" + bytes(8), "client", limits)[0] == Kind.AUDIO_IN
    with pytest.raises(ProtocolError) as e:
        decode(b"\x01" + bytes(10), "client", limits)
    assert e.value.code == P.TOO_LARGE and "10 bytes" in e.value.message
    big = b"\x04" + json.dumps({"type": "x", "pad": "a" * 20000}).encode()
    with pytest.raises(ProtocolError, match="limit"):
        decode(big, "client")
    with pytest.raises(ValueError):
        decode(b"\x01", "browser")


def test_client_handshake():
    h = P.parse_client_handshake({"protocol": 1})
    assert (h.protocol, h.input_rate, h.token) == (1, 16000, None)
    h = P.parse_client_handshake({"protocol": 1, "input_rate": 48000, "token": "t"})
    assert (h.input_rate, h.token) == (48000, "t")
    for bad in ({"protocol": 2}, {"protocol": True}, {"input_rate": 7999}, {"input_rate": 96000},
                {"input_rate": 16000.5}, {"input_rate": "16000"}, {"token": 123}):
        with pytest.raises(ProtocolError) as e:
            P.parse_client_handshake(bad)
        assert e.value.code == P.BAD_HANDSHAKE
    hs = P.server_handshake("abc", 16000, 24000, "demo")
    assert hs == {"protocol": 1, "session": "abc", "input_rate": 16000, "output_rate": 24000,
                  "model": "demo"}


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header is rewritten to claim width x height."""
    b = bytearray(real_jpeg())
    i = 2
    while b[i + 1] not in (0xC0, 0xC1, 0xC2):             # walk the segments to the SOF
        i += 2 + int.from_bytes(b[i + 2:i + 4], "big")
    b[i + 5:i + 7], b[i + 7:i + 9] = height.to_bytes(2, "big"), width.to_bytes(2, "big")
    return bytes(b)


def test_jpeg_dimensions_are_checked_from_the_header():
    assert P.jpeg_size(real_jpeg()) == (32, 24)
    assert decode(encode(Kind.VIDEO_IN, _jpeg_claiming(1920, 1080)), "client")[0] == Kind.VIDEO_IN
    for w, h in ((20000, 20000), (30000, 30000), (8000, 100), (0, 24)):
        big = _jpeg_claiming(w, h)
        assert len(big) < 1000
        with pytest.raises(ProtocolError) as e:
            decode(encode(Kind.VIDEO_IN, big), "client")
        assert e.value.code == P.BAD_VIDEO and f"{w}x{h}" in e.value.message
    with pytest.raises(ProtocolError, match="no frame header"):  # markers, but no SOF
        decode(encode(Kind.VIDEO_IN, JPEG), "client")
    crafted = b"\xff\xd8" + b"\xff\xfe\x00\x02" * 400_000 + real_jpeg()[2:]   # 1.6 MB of comments
    assert P.jpeg_size(crafted) is None                 # gives up after MAX_JPEG_MARKERS


@pytest.mark.parametrize("body", [b"[" * 2000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
                                  b'{"type": "x", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                  b'{"type": "x", "a": ' + b"[" * 40 + b"]" * 40 + b"}"],
                         ids=["list_2000", "object_5000", "event_5000", "event_40"])
def test_deeply_nested_json_is_a_protocol_error(body):
    for kind in (Kind.HANDSHAKE, Kind.EVENT):
        with pytest.raises(ProtocolError) as e:
            decode(bytes((kind,)) + body, "client", {**P.DEFAULT_LIMITS, kind: 1 << 20})
        assert e.value.code == P.BAD_JSON and "nested" in e.value.message


def test_protocol_version_must_be_the_integer_1():
    for version in (1.0, "1", [1]):
        with pytest.raises(ProtocolError) as e:
            P.parse_client_handshake({"protocol": version})
        assert e.value.code == P.BAD_HANDSHAKE
