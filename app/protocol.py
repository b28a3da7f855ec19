"""The browser websocket protocol (DESIGN.md, "Websocket protocol"): pure functions.

Every message is binary: the first byte is the kind, the rest the payload.

| kind | direction | payload |
| 0 handshake | both | JSON object (see below) |
| 1 audio in | client -> server | PCM16 little-endian mono at the handshake's input_rate |
| 2 video in | client -> server | one JPEG frame |
| 3 audio out | server -> client | PCM16 little-endian mono at the handshake's output_rate |
| 4 event | both | JSON object with a "type" |
| 5 error | server -> client | JSON object {"code": CODE, "message": text} |
| 6 video out | server -> client | one JPEG frame of the demo scene (app/server_scene.py) |

Handshake. The client opens with {"protocol": 1, "input_rate": 16000, "token": "..."}
("input_rate" defaults to 16000, "token" is needed only when the server was started with
one; "demo_scene": true or {"seed": N, "scene_seconds": S} makes the server render the demo
world as the session's camera and scene sound, app/server_scene.py). The server answers {"protocol": 1, "session": id, "input_rate": rate accepted,
"output_rate": codec rate, "model": name}.

Input rate: the server accepts any integer input_rate within [MIN_INPUT_RATE,
MAX_INPUT_RATE] and resamples to 16 kHz itself (speech.resample.StreamResampler: libsoxr,
any ratio at the same small cost; chunked output equals resampling the whole stream);
anything else is refused with "bad_handshake".
The browser client downsamples to 16 kHz in its AudioWorklet, so no resampling is the
usual case.

Limits, each checked before the work it bounds: per-kind payload sizes (DEFAULT_LIMITS,
capped by the server's --max-message-mb; a message over that gets "too_large" before the
close 1009), JSON nested at most MAX_JSON_DEPTH deep, JPEG frames at most MAX_VIDEO_SIDE px
a side as their header says. The server accepts websockets only from its own page's origin
(and --allow-origin ones); clients that send no Origin are not web pages.

Client events: {"type": "control", "action": "interrupt" | "reset" | "new_scene"}.
Server events ("t": seconds on the session clock = input audio received / input_rate):
  speech_start {t}, speech_end {t}               the VAD heard the user start / stop
  turn_start {t, turn, speech_start, speech_end}  end of the user's turn: a reply starts
  reply_text {t, turn, token, text}               text so far
  interrupt {t, turn, reason}                     barge-in | control | reset: drop queued audio
  turn_end {t, turn, text, interrupted}           the reply's audio is complete
  metrics {t, TurnMetrics fields (app/frames.py), browser_response_latency}
  transcript {turn, text}                         what the user said (after the reply is made;
                                                  only where the recogniser is installed)
  shutdown {message}                              the server is stopping; it then closes
  scene {t, index, description, examples, next_at}  demo scene: a new scene is shown
  scene_beep {t, t0, dur, freq, level_dbfs}       demo scene: a beep at session time t0
browser_response_latency: wall time the turn's first audio message was sent minus the wall
time the end of the user's speech arrived (DESIGN.md "Metrics", on the browser path).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

PROTOCOL_VERSION = 1
MIN_INPUT_RATE, MAX_INPUT_RATE = 8_000, 48_000


class Kind(IntEnum):
    HANDSHAKE = 0
    AUDIO_IN = 1
    VIDEO_IN = 2
    AUDIO_OUT = 3
    EVENT = 4
    ERROR = 5
    VIDEO_OUT = 6


CLIENT_KINDS = frozenset({Kind.HANDSHAKE, Kind.AUDIO_IN, Kind.VIDEO_IN, Kind.EVENT})
SERVER_KINDS = frozenset({Kind.HANDSHAKE, Kind.AUDIO_OUT, Kind.EVENT, Kind.ERROR, Kind.VIDEO_OUT})
JSON_KINDS = frozenset({Kind.HANDSHAKE, Kind.EVENT, Kind.ERROR})

# Error codes (kind 5 "code")
BAD_MESSAGE = "bad_message"          # empty, or a text frame where binary is required
UNKNOWN_KIND = "unknown_kind"
WRONG_DIRECTION = "wrong_direction"  # e.g. a client sending "audio out"
BAD_JSON = "bad_json"                # not UTF-8 JSON, or not a JSON object
BAD_AUDIO = "bad_audio"              # odd-length PCM16
BAD_VIDEO = "bad_video"              # not a (whole) JPEG
TOO_LARGE = "too_large"              # over the per-kind size limit
BAD_HANDSHAKE = "bad_handshake"      # missing/invalid handshake fields, or not first
BAD_EVENT = "bad_event"              # unknown event type or control action
UNAUTHORIZED = "unauthorized"        # token missing or wrong (the server then closes)
BUSY = "busy"                        # max_sessions reached (the server then closes)
TIMEOUT = "timeout"                  # no handshake in time (the server then closes)
TOO_MANY_ERRORS = "too_many_errors"  # the server gave up on a client (then closes)
INTERNAL = "internal"                # a server-side failure for this session

# Per-kind payload limits (bytes); the websocket max_size caps whole messages above these.
DEFAULT_LIMITS = {Kind.HANDSHAKE: 4096, Kind.EVENT: 16_384, Kind.ERROR: 16_384,
                  Kind.VIDEO_OUT: 2 * 1024 * 1024,          # demo-scene frames
                  Kind.AUDIO_IN: 2 * MAX_INPUT_RATE,        # 1 s of PCM16 at the top rate
                  Kind.AUDIO_OUT: 2 * MAX_INPUT_RATE * 4,
                  Kind.VIDEO_IN: 2 * 1024 * 1024}
CONTROL_ACTIONS = ("interrupt", "reset")
MAX_JSON_DEPTH = 16                  # nesting of JSON payloads (the protocol's own use 1)
MAX_VIDEO_SIDE = 4096                # px: a JPEG header claiming more is refused undecoded
MAX_JPEG_MARKERS = 256               # markers (and fill bytes) read looking for the frame header


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` is one of the error codes above."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def payload(self) -> dict:
        return {"code": self.code, "message": self.message}


def encode(kind: int, payload) -> bytes:
    """One message: dict payloads (kinds 0/4/5) become UTF-8 JSON; bytes-like payloads and
    int16 numpy arrays (kinds 1/2/3) are sent as they are (int16 as little-endian)."""
    kind = Kind(kind)
    if kind in JSON_KINDS:
        if not isinstance(payload, dict):
            raise TypeError(f"kind {kind.name} takes a dict payload, got {type(payload).__name__}")
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    elif isinstance(payload, np.ndarray):
        if payload.dtype != np.int16:
            raise TypeError(f"audio arrays must be int16 (speech.audio.float_to_pcm16), got {payload.dtype}")
        body = payload.astype("<i2", copy=False).tobytes()
    else:
        body = bytes(payload)
    return bytes((kind,)) + body


def _is_jpeg(b: bytes) -> bool:
    return len(b) >= 4 and b[:3] == b"\xff\xd8\xff" and b.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(b: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, read without decoding; None if the
    segments before the image data hold no frame header, or it is not within the first
    MAX_JPEG_MARKERS markers (real files have about ten; a crafted one must not keep the
    event loop walking megabytes of empty segments)."""
    i, n = 2, len(b)
    for _ in range(MAX_JPEG_MARKERS):
        if i + 4 > n:
            break
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:                          # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            i += 2
            continue
        if marker == 0xDA or marker == 0xD9:        # image data (or the end) before any SOF
            return None
        length = int.from_bytes(b[i + 2:i + 4], "big")
        if marker in _SOF:
            if i + 9 > n or length < 7:
                return None
            return int.from_bytes(b[i + 7:i + 9], "big"), int.from_bytes(b[i + 5:i + 7], "big")
        i += 2 + length
    return None


def json_depth(body: bytes) -> int:
    """Deepest nesting of `[`/`{` in JSON text (outside strings), without parsing it."""
    import re
    bare = np.frombuffer(re.sub(rb'"(?:[^"\\]|\\.)*"', b"", body), np.uint8)
    step = (np.isin(bare, (0x5B, 0x7B)).astype(np.int32) - np.isin(bare, (0x5D, 0x7D)))
    return int(np.cumsum(step).max(initial=0))


def decode(message, sender: str = "client", limits: dict | None = None):
    """Parse one message from `sender` ("client": what a server receives; "server": what a
    client receives) -> (Kind, payload): a dict for JSON kinds, bytes otherwise.
    Raises ProtocolError(code, message) for anything malformed."""
    if sender not in ("client", "server"):
        raise ValueError(f"sender must be 'client' or 'server', got {sender!r}")
    if isinstance(message, str):
        raise ProtocolError(BAD_MESSAGE, "text frames are not part of the protocol: send binary "
                                         "messages whose first byte is the kind")
    message = bytes(message)
    if not message:
        raise ProtocolError(BAD_MESSAGE, f"empty message: the first byte must be the kind "
                                         f"(0-{max(Kind)})")
    try:
        kind = Kind(message[0])
    except ValueError:
        raise ProtocolError(UNKNOWN_KIND, f"unknown message kind {message[0]}: kinds are "
                                          f"0-{max(Kind)}") from None
    allowed = CLIENT_KINDS if sender == "client" else SERVER_KINDS
    if kind not in allowed:
        raise ProtocolError(WRONG_DIRECTION, f"kind {int(kind)} ({kind.name.lower()}) is never sent "
                                             f"by a {sender}")
    body = message[1:]
    limit = (limits or DEFAULT_LIMITS).get(kind)
    if limit is not None and len(body) > limit:
        raise ProtocolError(TOO_LARGE, f"{kind.name.lower()} payload of {len(body)} bytes is over "
                                       f"the {limit}-byte limit for that kind")
    if kind in JSON_KINDS:
        if (depth := json_depth(body)) > MAX_JSON_DEPTH:
            raise ProtocolError(BAD_JSON, f"{kind.name.lower()} payload is JSON nested {depth} "
                                          f"deep; at most {MAX_JSON_DEPTH} levels are accepted")
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(BAD_JSON, f"{kind.name.lower()} payload is not UTF-8 JSON: {e}") from None
        except RecursionError:                          # never reached past the depth check
            raise ProtocolError(BAD_JSON, f"{kind.name.lower()} payload is JSON nested too "
                                          "deep") from None
        if not isinstance(obj, dict):
            raise ProtocolError(BAD_JSON, f"{kind.name.lower()} payload must be a JSON object, "
                                          f"got {type(obj).__name__}")
        if kind == Kind.EVENT and not isinstance(obj.get("type"), str):
            raise ProtocolError(BAD_EVENT, 'events need a string "type"')
        return kind, obj
    if kind in (Kind.AUDIO_IN, Kind.AUDIO_OUT):
        if len(body) % 2:
            raise ProtocolError(BAD_AUDIO, f"PCM16 needs an even number of bytes, got {len(body)}: "
                                           "a sample was split; send whole samples")
        return kind, body
    if not _is_jpeg(body):
        raise ProtocolError(BAD_VIDEO, f"video payload of {len(body)} bytes is not a whole JPEG "
                                       "(must start with FF D8 FF and end with FF D9)")
    size = jpeg_size(body)
    if size is None:
        raise ProtocolError(BAD_VIDEO, f"video payload of {len(body)} bytes has no frame header "
                                       "(SOF) before its image data: not a decodable JPEG")
    if not all(1 <= side <= MAX_VIDEO_SIDE for side in size):
        raise ProtocolError(BAD_VIDEO, f"JPEG header claims {size[0]}x{size[1]} pixels; frames "
                                       f"must be 1..{MAX_VIDEO_SIDE} px on each side (scale the "
                                       "camera frames down, e.g. to 640x480)")
    return kind, body


# --- handshake ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientHello:
    protocol: int
    input_rate: int
    token: str | None
    demo_scene: object = None            # app.demo_scene.DemoSceneOptions: render the demo world


def parse_client_handshake(obj: dict) -> ClientHello:
    """Validate the client's handshake object; raises ProtocolError(BAD_HANDSHAKE)."""
    version = obj.get("protocol", PROTOCOL_VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(BAD_HANDSHAKE, f"protocol version {version!r} is not supported; this "
                                           f"server speaks version {PROTOCOL_VERSION}")
    rate = obj.get("input_rate", 16_000)
    if (not isinstance(rate, int) or isinstance(rate, bool)
            or not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE):
        raise ProtocolError(BAD_HANDSHAKE, f"input_rate must be an integer number of Hz within "
                                           f"[{MIN_INPUT_RATE}, {MAX_INPUT_RATE}], got {rate!r}")
    token = obj.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError(BAD_HANDSHAKE, "token must be a string")
    try:
        scene = scene_options(obj.get("demo_scene"))
    except ValueError as e:
        raise ProtocolError(BAD_HANDSHAKE, str(e)) from None
    return ClientHello(version, rate, token, scene)


# --- the demo scene (app/server_scene.py) ----------------------------------------------------
SCENE_ACTIONS = ("new_scene",)       # control actions of a demo-scene session (besides CONTROL_ACTIONS)


def scene_options(obj):
    """The handshake's "demo_scene": absent/false/null -> None (the camera), true or
    {"seed": int | null, "scene_seconds": s (0: on request only)} -> DemoSceneOptions.
    Raises ValueError saying what is wrong."""
    from .demo_scene import DemoSceneOptions
    if obj is None or obj is False:
        return None
    if obj is True:
        obj = {}
    if not isinstance(obj, dict):
        raise ValueError(f"demo_scene must be true or an object {{\"seed\": N, \"scene_seconds\": S}}, "
                         f"got {type(obj).__name__}")
    unknown = set(obj) - {"seed", "scene_seconds"}
    if unknown:
        raise ValueError(f"demo_scene takes only seed and scene_seconds, got {sorted(unknown)}")
    seed, every = obj.get("seed"), obj.get("scene_seconds", DemoSceneOptions.scene_seconds)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"demo_scene seed must be an integer >= 0 or null, got {seed!r}")
    if not isinstance(every, (int, float)) or isinstance(every, bool):
        raise ValueError(f"demo_scene scene_seconds must be a number of seconds, got {every!r}")
    return DemoSceneOptions(seed=seed, scene_seconds=float(every))


def server_handshake(session: str, input_rate: int, output_rate: int, model: str) -> dict:
    return {"protocol": PROTOCOL_VERSION, "session": session, "input_rate": int(input_rate),
            "output_rate": int(output_rate), "model": model}


def error(code: str, message: str) -> bytes:
    return encode(Kind.ERROR, {"code": code, "message": message})


def event(type: str, **fields) -> bytes:
    return encode(Kind.EVENT, {"type": type, **fields})
