"""Session directories: round trip, foreign sessions, damaged files, SIGKILL recovery."""
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from app.session import FrameRef, SessionError, SessionWriter, load_session
from speech.constants import PCM16_MAX, SAMPLE_RATE

REPO = Path(__file__).resolve().parents[1]
# float -> PCM16 -> float: half a step of rounding, plus full scale 32767 vs 32768 (readers differ)
PCM16_TOL = dict(atol=1.01 / PCM16_MAX, rtol=1.5 / PCM16_MAX)


def _image(level: int, size=(48, 64)) -> np.ndarray:
    return np.full((*size, 3), level, np.uint8)


def _write_session(root, seconds=2.0, fps=10, seed=0):
    rng = np.random.default_rng(seed)
    audio = (rng.uniform(-0.9, 0.9, int(seconds * SAMPLE_RATE))).astype(np.float32)
    with SessionWriter(root, meta={"source": "test", "note": "ünïcode"}) as w:
        for chunk in np.array_split(audio, 37):
            w.write_audio(chunk)
        for i in range(int(seconds * fps)):
            w.write_frame(i / fps, image=_image(10 * i))
        w.write_event(0.5, "turn_start", who="user")
        w.write_event(1.5, "reply", text="a red ball", latency=0.25, ids=[1, 2])
        assert w.audio_seconds == pytest.approx(seconds)
    return audio


def test_round_trip(tmp_path):
    root = tmp_path / "s"
    audio = _write_session(root)
    s = load_session(root)
    assert s.meta["format"] == "tandem-session" and s.meta["version"] == 1
    assert s.meta["source"] == "test" and s.meta["note"] == "ünïcode" and "created" in s.meta
    assert s.meta["duration"] == pytest.approx(2.0)
    assert s.sample_rate == SAMPLE_RATE and s.audio.dtype == np.float32
    assert s.audio.shape == audio.shape
    np.testing.assert_allclose(s.audio, audio, **PCM16_TOL)
    assert [f.t for f in s.frames] == pytest.approx([i / 10 for i in range(20)])
    assert s.frames[3] == FrameRef(0.3, "frames/000003.jpg")
    for i in (0, 7, 19):
        img = s.read_frame(i)
        assert img.shape == (48, 64, 3) and img.dtype == np.uint8
        assert abs(float(img.mean()) - 10 * i) < 2
    assert s.events == [{"t": 0.5, "type": "turn_start", "who": "user"},
                        {"t": 1.5, "type": "reply", "text": "a red ball", "latency": 0.25,
                         "ids": [1, 2]}]
    assert s.frames_between(0.3, 0.6) == [3, 4, 5]
    assert s.frames_between(5.0, 6.0) == []
    assert s.duration == pytest.approx(2.0)
    assert s.warnings == [] and not any(s.recovered.values())


def test_writer_refuses_existing_and_validates(tmp_path):
    root = tmp_path / "s"
    _write_session(root, seconds=0.5)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        SessionWriter(root)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        SessionWriter(tmp_path / "file")
    (root / "notes.txt").write_text("keep me")
    with SessionWriter(root, overwrite=True) as w:
        w.write_audio(np.zeros(160, np.float32))
        with pytest.raises(ValueError, match="exactly one"):
            w.write_frame(0.0)
        with pytest.raises(ValueError, match="finite"):
            w.write_event(float("nan"), "x")
        with pytest.raises(ValueError, match="JSON"):
            w.write_event(0.0, "x", obj=object())
        with pytest.raises(ValueError, match="mono"):
            w.write_audio(np.zeros((10, 2), np.float32))
    s = load_session(root)
    assert len(s.audio) == 160 and s.frames == [] and s.events == []
    assert (root / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="closed"):
        w.write_audio(np.zeros(10, np.float32))


def _foreign_session(root: Path, rate: int, channels: int, subtype: str, seconds=1.5):
    """A session as another program might write it (no SessionWriter)."""
    root.mkdir()
    (root / "session.json").write_text(json.dumps(
        {"format": "tandem-session", "version": 1, "created": "2024-01-01T00:00:00Z",
         "recorder": "other"}))
    n = int(seconds * rate)
    tone = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(n) / rate)
    sf.write(root / "mic.wav", np.stack([tone] * channels, 1), rate, subtype=subtype)
    (root / "frames").mkdir()
    ok, jpg = cv2.imencode(".jpg", _image(128))
    lines = []
    for i, t in enumerate([0.2, 0.0, 0.1]):                 # not in time order
        (root / f"frames/f{i}.jpg").write_bytes(jpg.tobytes())
        lines.append(json.dumps({"t": t, "file": f"frames/f{i}.jpg", "camera": "cam0",
                                 "w": 64}))
    (root / "frames.jsonl").write_text("\n".join(lines))     # no final newline
    (root / "events.jsonl").write_text(
        '{"t": 0.3, "type": "custom_thing", "payload": {"a": 1}}\n')


@pytest.mark.parametrize("rate,channels,subtype", [(44_100, 2, "FLOAT"),
                                                   (8_000, 1, "PCM_16"),
                                                   (48_000, 1, "PCM_24")])
def test_foreign_session_any_rate(tmp_path, rate, channels, subtype):
    root = tmp_path / "s"
    _foreign_session(root, rate, channels, subtype)
    s = load_session(root)
    assert s.sample_rate == SAMPLE_RATE and s.audio.dtype == np.float32
    assert s.audio.ndim == 1 and abs(len(s.audio) - int(1.5 * SAMPLE_RATE)) <= 2
    spectrum = np.abs(np.fft.rfft(s.audio[1000:9000]))
    assert np.argmax(spectrum) * SAMPLE_RATE / 8000 == pytest.approx(1000, abs=2)
    assert np.abs(s.audio[1000:-1000]).max() == pytest.approx(0.5, abs=0.02)
    assert [f.file for f in s.frames] == ["frames/f1.jpg", "frames/f2.jpg", "frames/f0.jpg"]
    assert s.events == [{"t": 0.3, "type": "custom_thing", "payload": {"a": 1}}]
    assert s.meta["recorder"] == "other" and s.warnings == []


def test_damaged_session_is_recovered_with_warnings(tmp_path, caplog):
    root = tmp_path / "s"
    _write_session(root)
    (root / "frames/000004.jpg").unlink()
    jpg = (root / "frames/000006.jpg").read_bytes()
    (root / "frames/000006.jpg").write_bytes(jpg[: len(jpg) // 2])
    with open(root / "frames.jsonl", "ab") as f:
        f.write(b'{"t": 2.0, "file": "frames/0000')
    with open(root / "events.jsonl", "ab") as f:
        f.write(b'{"t": 1.9, "type": "rep')
    s = load_session(root)
    assert len(s.frames) == 18
    assert "frames/000004.jpg" not in [f.file for f in s.frames]
    assert "frames/000006.jpg" not in [f.file for f in s.frames]
    assert [e["type"] for e in s.events] == ["turn_start", "reply"]
    assert s.recovered == {"truncated_lines": 2, "bad_lines": 0, "missing_frames": 1,
                           "corrupt_frames": 1, "out_of_range": 0}
    text = "\n".join(s.warnings)
    assert "truncated" in text and "frames/000004.jpg" in text and "frames/000006.jpg" in text
    assert "JPEG missing" in caplog.text and "not decodable" in caplog.text


def test_bad_directories(tmp_path):
    def error(root) -> str:
        with pytest.raises(SessionError) as e:
            load_session(root)
        return str(e.value)

    assert "not a directory" in error(tmp_path / "nope")
    assert "session.json" in error(tmp_path)
    (tmp_path / "session.json").write_text("{not json")
    assert "not valid JSON" in error(tmp_path)
    (tmp_path / "session.json").write_text('{"format": "other", "version": 1}')
    assert "not a Tandem session" in error(tmp_path)
    (tmp_path / "session.json").write_text('{"format": "tandem-session", "version": 2}')
    assert "newer" in error(tmp_path) and "update Tandem" in error(tmp_path)
    (tmp_path / "session.json").write_text('{"format": "tandem-session", "version": 1}')
    assert "neither mic.wav nor any readable frame" in error(tmp_path)
    # frames without audio: a valid (video-only) session
    (tmp_path / "frames").mkdir()
    cv2.imwrite(str(tmp_path / "frames/a.jpg"), _image(50))
    (tmp_path / "frames.jsonl").write_text('{"t": 0.5, "file": "frames/a.jpg"}\n')
    s = load_session(tmp_path)
    assert len(s.audio) == 0 and len(s.frames) == 1 and s.duration == 0.5
    assert any("no mic.wav" in w for w in s.warnings)


# --- SIGKILL in the middle of a live recording -------------------------------------------

CHUNK = SAMPLE_RATE // 50     # 20 ms


def _signal(n0: int, n: int) -> np.ndarray:
    """The recorder's test signal: a sine whose frequency encodes the second."""
    idx = np.arange(n0, n0 + n)
    freq = 200.0 + 100.0 * (idx // SAMPLE_RATE)
    return (0.5 * np.sin(2 * np.pi * freq * idx / SAMPLE_RATE)).astype(np.float32)


RECORDER = f"""
import sys, time
import numpy as np
sys.path.insert(0, {str(REPO)!r})
from app.session import SessionWriter
from tests.test_session import _signal, _image, CHUNK
w = SessionWriter(sys.argv[1])
start, n = time.monotonic(), 0
while n < 20 * {SAMPLE_RATE}:                     # stops by itself if orphaned
    w.write_audio(_signal(n, CHUNK))
    n += CHUNK
    t = n / {SAMPLE_RATE}
    if n % (CHUNK * 5) == 0:                     # every 0.1 s: a frame and a progress line
        w.write_frame(t, image=_image(int(t * 20) % 250))
        print(f"{{t:.2f}}", flush=True)
    if n % (CHUNK * 25) == 0:
        w.write_event(t, "tick", n=n)
    time.sleep(max(0.0, start + t - time.monotonic()))    # real time
"""


def test_sigkill_recovers_up_to_last_second(tmp_path):
    root = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", RECORDER, str(root)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    recorded, deadline = 0.0, time.monotonic() + 30
    try:
        while recorded < 3.0:
            assert time.monotonic() < deadline, "recorder made no progress"
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                assert line, proc.stderr.read().decode()
                recorded = float(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    s = load_session(root)
    safe = recorded - 1.0          # everything up to here must have survived
    n = len(s.audio)
    assert n >= safe * SAMPLE_RATE, (n / SAMPLE_RATE, recorded)
    np.testing.assert_allclose(s.audio, _signal(0, n), **PCM16_TOL)  # sample-exact
    frame_t = [f.t for f in s.frames]
    want = [k / 10 for k in range(1, int(safe * 10) + 1)]
    assert frame_t[: len(want)] == pytest.approx(want)
    assert frame_t == pytest.approx([k / 10 for k in range(1, len(frame_t) + 1)])
    for i, f in enumerate(s.frames):
        assert abs(float(s.read_frame(i).mean()) - int(f.t * 20) % 250) < 2
    tick_t = [e["t"] for e in s.events]
    assert tick_t[: int(safe * 2)] == pytest.approx([k / 2 for k in range(1, int(safe * 2) + 1)])
    assert [e["n"] for e in s.events] == [round(t * SAMPLE_RATE) for t in tick_t]
