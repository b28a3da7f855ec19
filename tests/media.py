"""Small media made on the fly for tests: a video file stands in for the camera."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

MARKER = 16   # px: top-left square whose gray level encodes the frame index


def make_test_video(path, seconds: float = 2.0, fps: int = 10,
                    size: tuple[int, int] = (320, 240)) -> Path:
    """Write an MJPG AVI of a coloured square moving left to right on a dark background.

    The video has round(seconds * fps) frames; frame i's top-left MARKER x MARKER block
    has gray level `marker_level(i)`, so tests can tell which frame they got
    (`read_marker`). Returns the path."""
    path = Path(path)
    w, h = size
    n = int(round(seconds * fps))
    assert n > 0 and w >= 4 * MARKER and h >= 2 * MARKER, (n, size)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), float(fps), (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MJPG/AVI to {path}")
    side = max(8, h // 4)
    colours = [(40, 40, 220), (60, 200, 40), (230, 90, 50), (40, 210, 230)]  # BGR
    try:
        for i in range(n):
            img = np.full((h, w, 3), 30, np.uint8)
            x = int((w - side) * (i / max(1, n - 1)))
            y = (h - side) // 2
            cv2.rectangle(img, (x, y), (x + side - 1, y + side - 1), colours[i % 4], -1)
            img[:MARKER, :MARKER] = marker_level(i)
            writer.write(img)
    finally:
        writer.release()
    return path


def marker_level(index: int) -> int:
    """Gray level of frame `index`'s marker: steps of 12 so JPEG noise cannot confuse them."""
    return 12 * (index % 21) + 8


def read_marker(image: np.ndarray) -> int:
    """Frame index modulo 21 read back from a frame's marker block."""
    level = float(image[2:MARKER - 2, 2:MARKER - 2].mean())
    return int(round((level - 8) / 12)) % 21
