"""Camera capture (device, video file or stream) in a background thread, frame sampling, JPEG.

Frame times: live sources (a device or a stream URL) are stamped with `clock` when the frame
is read. A video file played with `realtime=True` is paced at its own fps and stamped with
its scheduled presentation time on `clock` (`started_at + index / fps`); a file read with
`realtime=False`, and every frame of `frames()`, is stamped on the file's own timeline
(`index / fps`). Indexes count up from 0 and keep counting across loops of a file.
"""
from __future__ import annotations

import math
import os
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Iterator

import cv2
import numpy as np

if "OPENCV_LOG_LEVEL" not in os.environ:
    # OpenCV's own "[ WARN:0] can't open camera by index" lines: CameraError says it, with
    # what to do (OPENCV_LOG_LEVEL=WARNING brings them back for debugging)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

_FALLBACK_FPS = 30.0          # used when a source does not report a usable fps
_HINT = ("List the cameras this machine has with `ls /dev/video*`, or use a video file "
         "instead with `--camera PATH_TO_VIDEO`.")


class CameraError(RuntimeError):
    """A camera, video file or stream could not be opened or stopped delivering frames."""


@dataclass(frozen=True)
class Frame:
    t: float            # seconds: `clock` at capture, or the file's timeline (see module doc)
    image: np.ndarray   # (H, W, 3) uint8 BGR, read-only
    index: int          # 0, 1, 2, ... in capture order


def _classify(source: int | str) -> tuple[str, int | str]:
    """-> ("device", index) | ("stream", url) | ("file", path); missing paths raise."""
    if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
        return "device", int(source)
    if not isinstance(source, (str, os.PathLike)):
        raise CameraError(f"camera source must be a device index, a video file or a stream "
                          f"URL, got {source!r}. {_HINT}")
    s = os.fspath(source)
    if s.strip().isdigit():
        return "device", int(s)
    if "://" in s:
        return "stream", s
    if not os.path.exists(s):
        raise CameraError(f"camera source {s!r} does not exist (neither a video file nor a "
                          f"device). {_HINT}")
    return ("file" if os.path.isfile(s) else "device"), s


def _as_bgr(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2 or img.shape[2] == 1:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    img = np.ascontiguousarray(img, dtype=np.uint8)
    img.flags.writeable = False
    return img


class Camera:
    """Reads `source` (device index, video file path or stream URL) in a background thread.

    `start()` blocks until the first frame (or raises CameraError after `open_timeout` s);
    `latest()` / `wait_frame()` then give the newest frame only (nothing queues up).
    For a file, `realtime=True` paces frames at the file's fps, `realtime=False` reads as fast
    as possible (so `latest()` may skip frames: use `frames()` to get every one).
    `loop=True` restarts a file at its end; otherwise `ended` becomes True there.
    """

    def __init__(self, source: int | str, *, realtime: bool = True, loop: bool = False,
                 clock: Callable[[], float] = time.monotonic, open_timeout: float = 5.0):
        if not open_timeout > 0:
            raise ValueError(f"open_timeout must be > 0 seconds, got {open_timeout}")
        self.source = source
        self.kind, self._target = _classify(source)
        self.realtime, self.loop, self.clock = realtime, loop, clock
        self.open_timeout = float(open_timeout)
        self._cond = threading.Condition()
        self._stop = threading.Event()        # one per run: a stale thread never publishes
        self._thread: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        self._latest: Frame | None = None
        self._ended = False
        self._opened = False
        self._error: CameraError | None = None
        self._fps: float | None = None
        self._size: tuple[int, int] | None = None
        self.started_at: float | None = None   # `clock` when frame 0 was delivered

    # --- properties -------------------------------------------------------------------
    @property
    def fps(self) -> float | None:
        """Frames per second reported by the source (fallback 30 if it reports none)."""
        return self._fps

    @property
    def size(self) -> tuple[int, int] | None:
        """(W, H) of the frames, known once the first frame was read."""
        return self._size

    @property
    def ended(self) -> bool:
        """True once the source is finished (end of file without loop, error, or stop())."""
        return self._ended

    @property
    def error(self) -> CameraError | None:
        """Why the capture thread ended early, if it did."""
        return self._error

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _describe(self) -> str:
        return {"device": "camera device", "file": "video file",
                "stream": "stream"}[self.kind] + f" {self._target!r}"

    # --- opening ------------------------------------------------------------------------
    def _open(self) -> cv2.VideoCapture:
        if self.kind == "stream":
            ms = int(self.open_timeout * 1000)
            cap = cv2.VideoCapture(self._target, cv2.CAP_FFMPEG,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms,
                                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        else:
            cap = cv2.VideoCapture(self._target)
        if not cap.isOpened():
            cap.release()
            what = {"device": "no such camera, or it is busy or not permitted",
                    "file": "not a video OpenCV can decode",
                    "stream": "unreachable, or not a video stream"}[self.kind]
            raise CameraError(f"could not open {self._describe()}: {what}. {_HINT}")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self._fps = float(fps) if math.isfinite(fps) and 0 < fps <= 1000 else _FALLBACK_FPS
        return cap

    # --- background thread ------------------------------------------------------------
    def start(self) -> "Camera":
        """Start capturing; returns once the first frame arrived. Raises CameraError."""
        if self.running:
            return self
        self._reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                        name="tandem-camera", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.open_timeout
        with self._cond:
            while self._latest is None and not self._ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            ok, error, opened = self._latest is not None, self._error, self._opened
        if ok:
            return self
        self.stop(join_timeout=0.5)
        if error is not None:
            raise error
        if opened:
            raise CameraError(f"{self._describe()} opened but delivered no frame within "
                              f"{self.open_timeout:g} s. {_HINT}")
        raise CameraError(f"timed out after {self.open_timeout:g} s opening "
                          f"{self._describe()}. {_HINT}")

    def stop(self, join_timeout: float = 5.0) -> None:
        """Stop the capture thread and wait for it to finish (and release the source)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(join_timeout)
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def __enter__(self) -> "Camera":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _publish(self, frame: Frame, stop: threading.Event) -> None:
        with self._cond:
            if stop is self._stop:
                self._latest = frame
                self._cond.notify_all()

    def _run(self, stop: threading.Event) -> None:
        error = None
        try:
            (self._run_file if self.kind == "file" else self._run_live)(stop)
        except CameraError as e:
            error = e
        except Exception as e:  # a failing backend must not die silently
            error = CameraError(f"{self._describe()} failed: {e!r}")
        with self._cond:
            if stop is self._stop:
                self._error = error
                self._ended = True
                self._cond.notify_all()

    def _run_live(self, stop: threading.Event) -> None:
        cap = self._open()
        self._opened = True
        try:
            index, last_ok = 0, time.monotonic()
            while not stop.is_set():
                ok, img = cap.read()
                if not ok or img is None:
                    if time.monotonic() - last_ok > self.open_timeout:
                        raise CameraError(f"{self._describe()} delivered no frame for "
                                          f"{self.open_timeout:g} s. {_HINT}")
                    stop.wait(0.01)
                    continue
                last_ok, t = time.monotonic(), self.clock()
                if index == 0:
                    self.started_at = t
                    self._size = (img.shape[1], img.shape[0])
                self._publish(Frame(t, _as_bgr(img), index), stop)
                index += 1
        finally:
            cap.release()

    def _file_images(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index, image) of every frame of the file, restarting it when looping."""
        cap = self._open()
        self._opened = True
        try:
            index, in_pass = 0, 0
            while True:
                ok, img = cap.read()
                if not ok or img is None:
                    if index == 0:
                        raise CameraError(f"{self._describe()} has no readable frames. {_HINT}")
                    if not (self.loop and in_pass > 0):
                        return
                    cap.release()
                    cap, in_pass = self._open(), 0
                    continue
                if index == 0:
                    self._size = (img.shape[1], img.shape[0])
                yield index, _as_bgr(img)
                index, in_pass = index + 1, in_pass + 1
        finally:
            cap.release()

    def _run_file(self, stop: threading.Event) -> None:
        with closing(self._file_images()) as images:
            for index, img in images:
                if stop.is_set():
                    return
                if index == 0:
                    self.started_at = self.clock()
                t = index / self._fps                      # the file's timeline
                if self.realtime:
                    t += self.started_at                   # scheduled time on `clock`
                    wait = t - self.clock()
                    if wait > 0 and stop.wait(wait):
                        return
                self._publish(Frame(t, img, index), stop)

    # --- consumers ----------------------------------------------------------------------
    def latest(self) -> Frame | None:
        """The newest frame, or None before the first one."""
        with self._cond:
            return self._latest

    def wait_frame(self, after_index: int = -1, timeout: float | None = None) -> Frame | None:
        """The newest frame with index > after_index; None on timeout or when ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._latest is None or self._latest.index <= after_index:
                if self._ended:
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return self._latest

    def frames(self) -> Iterator[Frame]:
        """Every frame of a video file in order, t = index / fps, read as fast as consumed.

        Independent of start(); opens its own reader. Loops forever with `loop=True`."""
        if self.kind != "file":
            raise CameraError(f"frames() reads video files; {self._describe()} is live: "
                              f"use start() with latest() / wait_frame().")
        with closing(self._file_images()) as images:
            for index, img in images:
                yield Frame(index / self._fps, img, index)


class FrameSampler:
    """Keeps frames at `fps` on the frames' own timeline, from a faster, jittery input.

    Target times form a fixed schedule t0, t0 + 1/fps, ...; the first frame at or after each
    target is accepted, so the long-run rate is exactly `fps` whatever the jitter (a schedule
    does not drift the way last-accepted + period does). Input gaps skip missed targets; a
    frame earlier than the last accepted one (a new timeline) restarts the schedule.
    """

    def __init__(self, fps: float):
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"FrameSampler fps must be a positive number of frames per "
                             f"second, got {fps!r}")
        self.fps = float(fps)
        self.period = 1.0 / self.fps
        self.reset()

    def reset(self) -> None:
        self._next: float | None = None   # next target time
        self._last: float | None = None   # t of the last accepted frame

    def offer(self, frame: Frame) -> bool:
        """True if the frame should be kept."""
        t = float(frame.t)
        if self._next is None or t < self._last:
            self._next, self._last = t + self.period, t
            return True
        eps = 1e-9 * max(1.0, abs(t))
        # at least half a period since the last accepted frame: no bursts after a late one
        if t + eps < self._next or t - self._last < 0.5 * self.period:
            return False
        missed = math.floor((t + eps - self._next) / self.period)  # targets the input skipped
        self._next += (missed + 1) * self.period
        self._last = t
        return True


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """(H, W, 3) uint8 BGR -> JPEG bytes."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        got = (type(image).__name__, getattr(image, "shape", None), getattr(image, "dtype", None))
        raise ValueError(f"encode_jpeg expects an (H, W, 3) uint8 BGR array, got {got}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    assert ok, "cv2.imencode failed on a valid image"
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 BGR. Raises ValueError on anything that is not a JPEG."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"not a JPEG image: expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if raw[:3] != b"\xff\xd8\xff" or raw.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise ValueError(f"not a JPEG image ({len(raw)} bytes, starting {raw[:8]!r}): "
                         f"send one JPEG-encoded frame per message")
    try:
        img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:
        img, why = None, str(e).strip().splitlines()[-1]
    else:
        why = "corrupt or truncated data"
    if img is None:
        raise ValueError(f"not a JPEG image ({len(raw)} bytes): {why}")
    return img
