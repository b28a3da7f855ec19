"""Session directories: the on-disk record of one conversation (see DESIGN.md, "Sessions").

```
SESSION/
  session.json   {"format": "tandem-session", "version": 1, "created": ISO-8601, ...}
  mic.wav        microphone, mono PCM (any rate; resampled on load)
  frames.jsonl   {"t": seconds from session start, "file": "frames/000123.jpg"} per frame
  frames/        JPEG frames
  events.jsonl   one JSON object per line, each with "t" (seconds) and "type"
```

Writing is append-only and crash-safe: every JSONL line goes out whole in one write, frame
JPEGs are renamed into place before their line is written, the WAV header is rewritten and
everything is fsynced once per second of session time. After a SIGKILL, `load_session`
recovers everything up to the last second before the kill.
"""
from __future__ import annotations

import bisect
import datetime
import json
import logging
import math
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from speech.audio import WavAppender, read_wav, resample, to_mono, wav_cut_short, wav_rate
from speech.constants import SAMPLE_RATE

log = logging.getLogger(__name__)

FORMAT = "tandem-session"
VERSION = 1
SYNC_SECONDS = 1.0          # fsync everything at least once per second of session time
SESSION_FILES = ("session.json", "mic.wav", "frames.jsonl", "frames", "events.jsonl")
MIC_RATES = (8_000, 192_000)  # Hz a mic.wav may have (its samples are resampled on load)
TIME_SLACK = 2.0              # s past the audio's end a frame or event may have (flush lag)
LAYOUT_HELP = ("a session directory must contain session.json "
               '({"format": "tandem-session", "version": 1, ...}) and mic.wav and/or '
               "frames.jsonl + frames/; events.jsonl is optional")


class SessionError(ValueError):
    """A directory that is not a readable Tandem session."""


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _json_line(obj: dict) -> bytes:
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"session line must be JSON-serialisable (finite numbers, str, "
                         f"lists, dicts): {e}") from None
    return (text + "\n").encode("utf-8")


def _check_time(t) -> float:
    t = float(t)
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"t must be a finite number of seconds >= 0, got {t}")
    return t


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(f, line: bytes) -> None:
    """One write() of a whole line to an unbuffered file (never half a line by design)."""
    n = f.write(line)
    if n != len(line):
        raise OSError(f"{f.name}: short write ({n} of {len(line)} bytes); disk full?")


def _write_atomic(path: Path, data: bytes, *, fsync: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class SessionWriter:
    """Records a session directory append-only; safe to kill at any moment.

    Session time advances with the audio written; frames and events carry their own `t`.
    Thread-safe: audio, frames and events may come from different threads.
    """

    def __init__(self, root, *, sample_rate: int = SAMPLE_RATE, meta: dict | None = None,
                 overwrite: bool = False):
        self.root = Path(root)
        self.sample_rate = int(sample_rate)
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
        meta = dict(meta or {})
        clash = {"format", "version"} & meta.keys()
        if clash:
            raise ValueError(f"meta may not set {sorted(clash)}: the writer sets them")
        self.meta = {"format": FORMAT, "version": VERSION,
                     "created": datetime.datetime.now().astimezone().isoformat(),
                     "sample_rate": self.sample_rate, **meta}
        header = _json_line(self.meta)          # checks meta before touching the disk
        self._prepare_root(overwrite)
        _write_atomic(self.root / "session.json", header, fsync=True)
        (self.root / "frames").mkdir()
        self._wav = WavAppender(self.root / "mic.wav", self.sample_rate, SYNC_SECONDS)
        # Unbuffered: each line is exactly one write() to the OS.
        self._frames_f = open(self.root / "frames.jsonl", "ab", buffering=0)
        self._events_f = open(self.root / "events.jsonl", "ab", buffering=0)
        _fsync_path(self.root)
        self._lock = threading.Lock()
        self._n_samples = 0
        self._n_frames = 0
        self._last_t = 0.0
        self._synced_at = (0.0, 0.0)            # (audio_seconds, last_t) at the last sync
        self._unsynced_frames: list[Path] = []
        self._closed = False

    def _prepare_root(self, overwrite: bool) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory; choose a new "
                                  f"session directory")
        if root.is_dir() and any(root.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{root} is not empty; choose a new session "
                                      f"directory or pass overwrite=True to replace it")
            for name in SESSION_FILES:       # remove only what a session owns
                p = root / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
        root.mkdir(parents=True, exist_ok=True)

    @property
    def audio_seconds(self) -> float:
        """Seconds of microphone audio written so far."""
        return self._n_samples / self.sample_rate

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"session {self.root} is closed")

    def write_audio(self, pcm: np.ndarray) -> None:
        """Append float32 mono PCM at `sample_rate` (values in [-1, 1])."""
        pcm = np.asarray(pcm)
        if pcm.ndim == 2 and pcm.shape[1] == 1:
            pcm = pcm[:, 0]
        if pcm.ndim != 1 or not np.issubdtype(pcm.dtype, np.floating):
            raise ValueError(f"write_audio takes float mono PCM of shape (T,), got "
                             f"{pcm.dtype} {pcm.shape}")
        with self._lock:
            self._check_open()
            self._wav.write(pcm.astype(np.float32, copy=False))
            self._n_samples += len(pcm)
            self._maybe_sync()

    def write_frame(self, t: float, image: np.ndarray | None = None,
                    jpeg: bytes | None = None) -> str:
        """Store one camera frame (BGR/gray uint8 image, or ready JPEG bytes) taken at `t`.

        Returns the frame's path relative to the session root ("frames/000123.jpg").
        """
        t = _check_time(t)
        if (image is None) == (jpeg is None):
            raise ValueError("write_frame takes exactly one of image= or jpeg=")
        if image is not None:
            data = _encode_jpeg(image)
        else:
            data = bytes(jpeg)
            if not data.startswith(b"\xff\xd8"):
                raise ValueError("jpeg= must be JPEG bytes (starting with FF D8)")
        with self._lock:
            self._check_open()
            rel = f"frames/{self._n_frames:06d}.jpg"
            path = self.root / rel
            _write_atomic(path, data, fsync=False)
            self._unsynced_frames.append(path)
            _append(self._frames_f, _json_line({"t": t, "file": rel}))
            self._n_frames += 1
            self._last_t = max(self._last_t, t)
            self._maybe_sync()
        return rel

    def write_event(self, t: float, type: str, **fields) -> None:
        """Append one event line {"t": t, "type": type, **fields}."""
        t = _check_time(t)
        if not isinstance(type, str) or not type:
            raise ValueError(f"event type must be a non-empty string, got {type!r}")
        line = _json_line({"t": t, "type": type, **fields})
        with self._lock:
            self._check_open()
            _append(self._events_f, line)
            self._last_t = max(self._last_t, t)
            self._maybe_sync()

    def _maybe_sync(self) -> None:
        audio_at, t_at = self._synced_at        # two clocks: a wild t cannot stall syncing
        if (self.audio_seconds - audio_at >= SYNC_SECONDS
                or self._last_t - t_at >= SYNC_SECONDS):
            self._sync()

    def _sync(self) -> None:
        self._wav.flush()                       # rewrites the WAV sizes and fsyncs
        for path in self._unsynced_frames:      # JPEG data before the lines naming them
            _fsync_path(path)
        self._unsynced_frames.clear()
        _fsync_path(self.root / "frames")
        os.fsync(self._frames_f.fileno())
        os.fsync(self._events_f.fileno())
        self._synced_at = (self.audio_seconds, self._last_t)

    def flush(self) -> None:
        """Make everything written so far durable now."""
        with self._lock:
            self._check_open()
            self._sync()

    def close(self) -> None:
        """Finalise the WAV, record the duration in session.json and close the files."""
        with self._lock:
            if self._closed:
                return
            self._sync()
            self._wav.close()
            self._frames_f.close()
            self._events_f.close()
            self.meta["duration"] = max(self.audio_seconds, self._last_t)
            _write_atomic(self.root / "session.json", _json_line(self.meta), fsync=True)
            _fsync_path(self.root)
            self._closed = True

    def __enter__(self) -> "SessionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _encode_jpeg(image: np.ndarray) -> bytes:
    import cv2
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                          and image.shape[2] in (1, 3))):
        raise ValueError(f"image must be uint8 (H, W, 3) BGR or (H, W) gray, got "
                         f"{image.dtype} {image.shape}")
    ok, buf = cv2.imencode(".jpg", image)
    assert ok, image.shape
    return buf.tobytes()


# --- reading -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameRef:
    t: float          # seconds from session start
    file: str         # path relative to the session root


@dataclass
class Session:
    """A loaded session: audio resampled to `sample_rate`, frames sorted by time."""
    root: Path
    meta: dict
    audio: np.ndarray                 # (T,) float32 at sample_rate
    sample_rate: int
    frames: list[FrameRef]            # sorted by t
    events: list[dict]                # sorted by t (stable)
    warnings: list[str] = field(default_factory=list)
    recovered: dict[str, int] = field(default_factory=dict)  # what loading skipped/repaired

    @property
    def duration(self) -> float:
        """Seconds: the longest of the audio, the last frame and the last event."""
        ends = [len(self.audio) / self.sample_rate]
        ends += [self.frames[-1].t] if self.frames else []
        ends += [self.events[-1]["t"]] if self.events else []
        return max(ends)

    def read_frame(self, i: int) -> np.ndarray:
        """Decode frame `i` as a BGR uint8 image (H, W, 3)."""
        import cv2
        path = self.root / self.frames[i].file
        image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise SessionError(f"{path} is not a decodable JPEG")
        return image

    def frames_between(self, t0: float, t1: float) -> list[int]:
        """Indices of the frames with t0 <= t < t1."""
        lo = bisect.bisect_left(self.frames, t0, key=lambda f: f.t)
        return list(range(lo, bisect.bisect_left(self.frames, t1, lo, key=lambda f: f.t)))


class _Problems:
    """Collects what loading skipped, one warning per kind (not one per line)."""

    KINDS = ("truncated_lines", "bad_lines", "missing_frames", "corrupt_frames", "out_of_range")

    def __init__(self):
        self.counts = dict.fromkeys(self.KINDS, 0)
        self.examples: dict[str, list[str]] = {k: [] for k in self.KINDS}

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(example)

    def warnings(self) -> list[str]:
        what = {"truncated_lines": "truncated last line ignored (crash while writing?)",
                "bad_lines": "malformed line(s) ignored",
                "missing_frames": "frame(s) skipped: JPEG missing",
                "corrupt_frames": "frame(s) skipped: JPEG not decodable",
                "out_of_range": "line(s) ignored: time outside the session's audio"}
        return [f"{n} {what[k]}: {', '.join(self.examples[k])}"
                + (", ..." if n > len(self.examples[k]) else "")
                for k, n in self.counts.items() if n]


def _is_time(t) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)


def _read_jsonl(path: Path, problems: _Problems) -> list[dict]:
    if not path.is_file():
        return []
    raw_lines = path.read_bytes().split(b"\n")
    out = []
    for i, raw in enumerate(raw_lines):
        if not raw.strip():
            continue
        where = f"{path.name}:{i + 1}"
        try:
            obj = json.loads(raw)
        except ValueError:                    # includes UnicodeDecodeError
            last = i == len(raw_lines) - 1   # no newline after it: cut off mid-write
            problems.add("truncated_lines" if last else "bad_lines", where)
            continue
        if not isinstance(obj, dict) or not _is_time(obj.get("t")):
            problems.add("bad_lines", f"{where} (needs a numeric \"t\")")
            continue
        out.append(obj)
    return out


def _jpeg_ok(path: Path) -> bool:
    """Cheap check (no decoding) that a JPEG is whole: SOI at the start, EOI at the end."""
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(max(0, path.stat().st_size - 64))
        tail = f.read()
    if head != b"\xff\xd8":
        return False
    if tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return True
    import cv2                                  # unusual tail: decode to be sure
    return cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR) is not None


def _read_frames(root: Path, problems: _Problems) -> list[FrameRef]:
    frames = []
    for obj in _read_jsonl(root / "frames.jsonl", problems):
        rel = obj.get("file")
        if not isinstance(rel, str) or not rel:
            problems.add("bad_lines", f"frames.jsonl t={obj['t']} (needs \"file\")")
            continue
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            problems.add("bad_lines", f"frames.jsonl {rel!r} (outside the session)")
            continue
        path = root / rel
        if not path.is_file():
            problems.add("missing_frames", rel)
        elif not _jpeg_ok(path):
            problems.add("corrupt_frames", rel)
        else:
            frames.append(FrameRef(float(obj["t"]), rel))
    frames.sort(key=lambda f: f.t)
    return frames


def _read_meta(root: Path) -> dict:
    if not root.is_dir():
        raise SessionError(f"{root} is not a directory; {LAYOUT_HELP}")
    path = root / "session.json"
    if not path.is_file():
        raise SessionError(f"{root} has no session.json; {LAYOUT_HELP}")
    try:
        meta = json.loads(path.read_bytes())
    except ValueError as e:
        raise SessionError(f"{path} is not valid JSON ({e}); {LAYOUT_HELP}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise SessionError(f"{path} has format {got!r}, not {FORMAT!r}: not a Tandem "
                           f"session; {LAYOUT_HELP}")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SessionError(f"{path} has version {version!r}; expected an integer 1.."
                           f"{VERSION}")
    if version > VERSION:
        raise SessionError(f"{path} is session format version {version}, newer than the "
                           f"version {VERSION} this Tandem reads; update Tandem to load it")
    return meta


def _read_mic(mic: Path, sample_rate: int, notes: list[str]) -> np.ndarray:
    """mic.wav as mono float32 at `sample_rate`; a rate outside MIC_RATES is refused before
    any sample is read (1 Hz resampled to 16 kHz would be 16000 times the file)."""
    try:
        rate = wav_rate(mic)
        if not MIC_RATES[0] <= rate <= MIC_RATES[1]:
            raise SessionError(f"{mic}: its header says {rate} Hz; a session's audio must be "
                               f"{MIC_RATES[0]}..{MIC_RATES[1]} Hz (fix the header or re-encode "
                               "it, e.g. sox IN.wav -r 16000 mic.wav)")
        short = wav_cut_short(mic)
        audio, rate = read_wav(mic)     # tolerates a header never finalised (crash)
    except ValueError as e:
        if isinstance(e, SessionError):
            raise
        raise SessionError(f"{mic} could not be read: {e}") from e
    if short:
        notes.append(f"{mic.name} is cut short: its header says {short[0]:.2f} s, the file "
                     f"holds {short[1]:.2f} s; using the {short[1]:.2f} s there are")
    return resample(to_mono(audio), rate, sample_rate) if len(audio) else audio[:0]


def _within(items: list, end: float, name: str, problems: _Problems) -> list:
    """Frames or events whose t is within [0, end]; the others are reported."""
    kept = []
    for x in items:
        t = x.t if isinstance(x, FrameRef) else x["t"]
        if 0 <= t <= end:
            kept.append(x)
        else:
            problems.add("out_of_range", f"{name} t={t:g} (outside the session: 0..{end:.2f} s)")
    return kept


def load_session(root, sample_rate: int = SAMPLE_RATE) -> Session:
    """Load a session directory (also one whose writer was killed mid-session).

    Audio is mixed to mono and resampled to `sample_rate`. Truncated JSONL lines, frames
    whose JPEG is missing or corrupt and frames/events timed outside [0, audio end +
    TIME_SLACK] are skipped, each kind with one warning (logged, and listed in
    `Session.warnings`; counts in `Session.recovered`); so is a mic.wav cut short.
    Raises SessionError (naming the file and the problem) if `root` is not a readable
    session, or its mic.wav's rate is outside MIC_RATES.
    """
    root = Path(root)
    meta = _read_meta(root)
    problems = _Problems()
    frames = _read_frames(root, problems)
    events = []
    for obj in _read_jsonl(root / "events.jsonl", problems):
        if isinstance(obj.get("type"), str):
            events.append(obj)
        else:
            problems.add("bad_lines", f"events.jsonl t={obj['t']} (needs a string \"type\")")
    events.sort(key=lambda e: e["t"])
    mic, notes = root / "mic.wav", []
    if mic.is_file():
        audio = _read_mic(mic, sample_rate, notes)
        end = len(audio) / sample_rate + TIME_SLACK
        frames, events = _within(frames, end, "frames.jsonl", problems), \
            _within(events, end, "events.jsonl", problems)
    elif frames:
        audio = np.zeros(0, np.float32)
        notes.append("no mic.wav: the session has frames but no audio")
    else:
        raise SessionError(f"{root} has neither mic.wav nor any readable frame; "
                           f"{LAYOUT_HELP}")
    warnings = problems.warnings() + notes
    audio = np.ascontiguousarray(audio.reshape(-1) if audio.size == 0 else audio, np.float32)
    assert audio.ndim == 1, audio.shape
    for w in warnings:
        log.warning("session %s: %s", root, w)
    return Session(root=root, meta=meta, audio=audio, sample_rate=int(sample_rate),
                   frames=frames, events=events, warnings=warnings,
                   recovered=dict(problems.counts))
