"""vision/: camera (on a generated video file), sampler, JPEG, preprocess, encoder, ring."""
import dataclasses
import functools
import http.server
import itertools
import json
import math
import socket
import threading
import time

import cv2
import numpy as np
import pytest
import torch

from tests.media import make_test_video, read_marker
from vision.camera import Camera, CameraError, Frame, FrameSampler, decode_jpeg, encode_jpeg
from vision.encoder import (VISION_PRESETS, PatchVisionEncoder, VisionConfig,
                            build_vision_encoder, preprocess)
from vision.ring import TimedRing

N_FRAMES = 20   # 2 s at 10 fps


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_test_video(tmp_path_factory.mktemp("media") / "moving.avi", seconds=2.0, fps=10)


# --- camera -----------------------------------------------------------------------------
def test_frames_yields_every_frame_in_order(video):
    cam = Camera(str(video), realtime=False)
    frames = list(cam.frames())
    assert [f.index for f in frames] == list(range(N_FRAMES))
    assert [f.t for f in frames] == pytest.approx([i / 10 for i in range(N_FRAMES)])
    assert [read_marker(f.image) for f in frames] == list(range(N_FRAMES))
    assert cam.fps == 10 and cam.size == (320, 240)
    img = frames[0].image
    assert img.shape == (240, 320, 3) and img.dtype == np.uint8 and not img.flags.writeable
    # the square moves left to right: its red/colour mass shifts
    col_first = np.argmax(np.abs(frames[0].image.astype(int) - 30).sum(axis=(0, 2))[32:]) + 32
    col_last = np.argmax(np.abs(frames[-1].image.astype(int) - 30).sum(axis=(0, 2))[32:]) + 32
    assert col_last > col_first + 100


def test_frames_loop_keeps_counting(video):
    frames = list(itertools.islice(Camera(video, loop=True).frames(), 45))
    assert [f.index for f in frames] == list(range(45))
    assert frames[44].t == pytest.approx(4.4)
    assert [read_marker(f.image) for f in frames] == [i % N_FRAMES for i in range(45)]


def test_realtime_file_is_paced_and_stops_cleanly(video):
    t0 = time.monotonic()
    with Camera(video, realtime=True, clock=lambda: time.monotonic() - 50.0) as cam:
        first = cam.latest()
        assert first is not None and first.index == 0
        deadline = time.monotonic() + 10                # generous: two busy cores
        while (f := cam.latest()).index < 3:
            assert time.monotonic() < deadline, f"only frame {f.index} after 10 s"
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        assert f.index <= elapsed * 10 + 1, (f.index, elapsed)   # paced: never ahead, 10 fps
        assert f.t == pytest.approx(cam.started_at + f.index / 10)
        assert abs(cam.started_at - (t0 - 50.0)) < 0.5                 # on the given clock
        assert read_marker(f.image) == f.index
        nxt = cam.wait_frame(f.index, timeout=5.0)
        assert nxt is not None and nxt.index > f.index and nxt.t > f.t
        thread = cam._thread
        assert not cam.ended
        t_stop = time.monotonic()
    assert time.monotonic() - t_stop < 5.0     # stops without waiting out the file
    assert not thread.is_alive() and cam.ended
    assert cam.wait_frame(nxt.index, timeout=0.1) is None


def test_fast_file_reaches_end(video):
    cam = Camera(video, realtime=False).start()
    try:
        deadline = time.monotonic() + 5
        while not cam.ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cam.ended and cam.error is None
        last = cam.latest()
        assert last.index == N_FRAMES - 1 and last.t == pytest.approx((N_FRAMES - 1) / 10)
        assert cam.wait_frame(last.index, timeout=1.0) is None   # ended: no wait
    finally:
        cam.stop()


def _fails_fast(make, seconds=3.0):
    t0 = time.monotonic()
    with pytest.raises(CameraError) as err:
        make()
    assert time.monotonic() - t0 < seconds
    return str(err.value)


def test_missing_device_and_file_fail_fast(tmp_path):
    msg = _fails_fast(lambda: Camera(9).start())
    assert "9" in msg and "/dev/video" in msg and "--camera" in msg
    msg = _fails_fast(lambda: Camera(str(tmp_path / "nope.avi")))
    assert "nope.avi" in msg and "does not exist" in msg and "--camera" in msg
    bogus = tmp_path / "bogus.avi"
    bogus.write_bytes(b"this is not a video" * 100)
    msg = _fails_fast(lambda: Camera(bogus).start())
    assert "bogus.avi" in msg
    with pytest.raises(CameraError, match="video files"):
        next(Camera(0).frames())


def test_stream_that_never_answers_times_out():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/cam.mjpg"
        msg = _fails_fast(lambda: Camera(url, open_timeout=1.0).start(), seconds=4.0)
        assert "cam.mjpg" in msg
    finally:
        server.close()
        for c in accepted:
            c.close()


def test_stream_is_read_live_with_clock_times(video):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=video.parent)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clock = lambda: time.monotonic() + 1000.0                         # noqa: E731
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{video.name}"
        t0 = clock()
        with Camera(url, clock=clock, open_timeout=1.0) as cam:
            assert cam.kind == "stream" and cam.size == (320, 240)
            got, idx = [], -1
            while (f := cam.wait_frame(idx, timeout=3.0)) is not None:   # None once ended
                got.append(f)
                idx = f.index
            assert cam.ended and isinstance(cam.error, CameraError)   # stream stopped
            assert "delivered no frame" in str(cam.error)
        assert [f.index for f in got] == sorted({f.index for f in got}) and got[-1].index == 19
        assert all(read_marker(f.image) == f.index for f in got)
        assert all(t0 <= f.t <= clock() for f in got)
    finally:
        server.shutdown()
        server.server_close()


# --- sampler ----------------------------------------------------------------------------
def _frame(t, i=0):
    return Frame(t, np.zeros((2, 2, 3), np.uint8), i)


def test_sampler_keeps_rate_over_jittery_input():
    rng = np.random.default_rng(0)
    times = np.arange(300) / 30 + rng.uniform(-0.008, 0.008, 300)      # 10 s at ~30 fps
    sampler = FrameSampler(5.0)
    kept = np.array([t for i, t in enumerate(times) if sampler.offer(_frame(t, i))])
    assert abs(len(kept) - 50) <= 1
    per_second = np.histogram(kept, bins=np.arange(0, 11))[0]
    assert per_second.min() >= 4 and per_second.max() <= 6, per_second
    assert np.diff(kept).min() >= 0.1 and np.diff(kept).mean() == pytest.approx(0.2, abs=0.01)


def test_sampler_exact_input_and_gaps():
    sampler = FrameSampler(5)
    assert sum(sampler.offer(_frame(i / 30)) for i in range(300)) == 50   # no drift
    slow = FrameSampler(5)
    assert all(slow.offer(_frame(i / 3)) for i in range(30))          # slower input: all kept
    gap = FrameSampler(5)
    before = [t for t in np.arange(0, 2, 1 / 30) if gap.offer(_frame(t))]
    after = [t for t in np.arange(5, 7, 1 / 30) if gap.offer(_frame(t))]  # 3 s pause
    assert len(before) == 10 and abs(len(after) - 10) <= 1 and after[0] == 5
    assert gap.offer(_frame(0.0))                                     # timeline restarted


@pytest.mark.parametrize("fps", [0, -5, float("nan"), float("inf"), "5"])
def test_sampler_rejects_bad_fps(fps):
    with pytest.raises(ValueError, match="positive"):
        FrameSampler(fps)


# --- JPEG -------------------------------------------------------------------------------
def test_jpeg_round_trip_and_errors():
    y, x = np.mgrid[0:120, 0:160]
    img = np.stack([x * 255 // 160, y * 255 // 120, np.full_like(x, 90)], -1).astype(np.uint8)
    data = encode_jpeg(img, quality=95)
    assert data[:2] == b"\xff\xd8"
    back = decode_jpeg(data)
    assert back.shape == img.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - img).mean() < 3
    assert len(encode_jpeg(img, quality=20)) < len(data)
    for bad in [b"", b"hello world", data[: len(data) // 2], b"\xff\xd8\xff" + b"\0" * 50]:
        with pytest.raises(ValueError, match="not a JPEG image"):
            decode_jpeg(bad)
    with pytest.raises(ValueError, match="uint8"):
        encode_jpeg(img.astype(np.float32))
    with pytest.raises(ValueError, match="quality"):
        encode_jpeg(img, quality=0)


# --- preprocess + encoder ---------------------------------------------------------------
def test_preprocess_shapes_range_and_rgb():
    cfg = VISION_PRESETS["demo"]
    blue = np.zeros((240, 320, 3), np.uint8)
    blue[..., 0] = 255                                                 # BGR blue
    x = preprocess([blue, np.full((50, 70, 3), 128, np.uint8)], cfg)
    assert x.shape == (2, 3, 72, 96) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.all(x[0, 2] == 1) and torch.all(x[0, :2] == 0)        # RGB order
    assert torch.allclose(x[1], torch.full_like(x[1], 128 / 255))
    assert preprocess(blue, cfg).shape == (1, 3, 72, 96)
    assert preprocess(np.stack([blue] * 3), cfg).shape == (3, 3, 72, 96)


@pytest.mark.parametrize("bad", [[], [np.zeros((10, 10, 3), np.float32)],
                                 [np.zeros((10, 10), np.uint8)],
                                 [np.zeros((10, 10, 4), np.uint8)], "image.jpg"])
def test_preprocess_errors(bad):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        preprocess(bad, VISION_PRESETS["tiny"])


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_encoder_shapes_and_gradients(preset):
    torch.manual_seed(0)
    cfg = VISION_PRESETS[preset]
    enc = build_vision_encoder(cfg)
    assert isinstance(enc, PatchVisionEncoder)
    w, h = cfg.image_size
    x = torch.rand(2, 3, h, w)
    out = enc(x)
    assert out.shape == (2, 9, cfg.width) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    xy = enc.token_xy()
    assert xy.shape == (9, 2) and bool(((xy > 0) & (xy < 1)).all())
    assert torch.all(xy[:3, 1] == xy[0, 1]) and torch.all(xy[[0, 3, 6], 0] == xy[0, 0])
    assert xy[0, 0] < xy[1, 0] < xy[2, 0] and xy[0, 1] < xy[3, 1] < xy[6, 1]   # row-major
    with pytest.raises(ValueError, match="preprocess"):
        enc(torch.rand(2, 3, h + 1, w))


def _scene(slot_x, colour=(40, 40, 220), side=64):
    img = np.full((240, 320, 3), 30, np.uint8)
    cx, cy = int(slot_x * 320), 120
    cv2.rectangle(img, (cx - side // 2, cy - side // 2), (cx + side // 2, cy + side // 2),
                  colour, -1)
    return img


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_encoder_tokens_follow_object_position(preset):
    torch.manual_seed(0)
    cfg = VISION_PRESETS[preset]
    enc = build_vision_encoder(cfg).eval()
    with torch.no_grad():
        out = enc(preprocess([_scene(0.2), _scene(0.8), _scene(0.2, side=82),
                              _scene(0.2, colour=(230, 90, 50))], cfg))
    diff = (out[0] - out[1]).norm(dim=-1).view(3, 3)                   # (rows, cols)
    mid = diff[1]                                                      # middle row
    assert mid[0] > 1.5 * mid[1] and mid[2] > 1.5 * mid[1], diff
    for other in (out[2], out[3]):                                     # pulse, colour
        d = (out[0] - other).norm(dim=-1).view(3, 3)
        assert d[1, 0] == d.max() and d[1, 0] > 0.1 * out[0, 3].norm(), d


@pytest.mark.parametrize("kind", ["patch", "conv"])
def test_encoder_without_position_embedding_is_translation_equivariant(kind):
    # pos_emb=False: an object gives the same tokens wherever it stands (positions are then the
    # fusion's cell embeddings)
    size, patch = (96, 72), 8
    x = torch.full((2, 3, size[1], size[0]), 0.1)
    x[0, :, 24:40, 24:40] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]    # patches (3-4, 3-4)
    x[1, :, 24:40, 56:72] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]    # patches (3-4, 7-8)
    tokens = {}
    for pos_emb in (False, True):
        torch.manual_seed(0)
        cfg = VisionConfig(image_size=size, width=32, layers=1, heads=2, patch=patch, kind=kind,
                           grid=(size[0] // patch, size[1] // patch), pos_emb=pos_emb)
        with torch.no_grad():
            out = build_vision_encoder(cfg).eval()(x).view(2, 9, 12, -1)          # per patch
        tokens[pos_emb] = (out[0, 2:6, 2:6], out[1, 2:6, 6:10])                   # object + ring
    a, b = tokens[False]
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    a, b = tokens[True]
    assert not torch.allclose(a, b, atol=1e-2)


def test_vision_config_validation_and_json():
    cfg = VISION_PRESETS["demo"]
    assert VisionConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    for kwargs, match in [(dict(image_size=(100, 72)), "divisible"),
                          (dict(grid=(13, 3)), "patch grid"),
                          (dict(width=30, heads=4), "divide"),
                          (dict(kind="conv", image_size=(96, 72), patch=6, grid=(3, 3)),
                           "power-of-two")]:
        with pytest.raises(ValueError, match=match):
            VisionConfig(**kwargs)
    with pytest.raises(NotImplementedError, match="patch"):
        build_vision_encoder(VisionConfig(kind="clip"))


# --- ring -------------------------------------------------------------------------------
def test_ring_wraps_and_keeps_latest_in_order():
    ring = TimedRing(5, (2,))
    nbytes = ring.nbytes
    for i in range(50):
        ring.push(i * 0.1, torch.full((2,), float(i)))
    assert len(ring) == 5 and ring.nbytes == nbytes
    items, times = ring.latest(10)
    assert items[:, 0].tolist() == [45, 46, 47, 48, 49]
    assert times.dtype == torch.float64 and times.tolist() == pytest.approx([4.5, 4.6, 4.7, 4.8, 4.9])
    assert ring.latest(2)[0][:, 0].tolist() == [48, 49] and len(ring.latest(0)[0]) == 0
    items[:] = -1                                                      # a copy
    assert ring.latest(1)[0][0, 0] == 49


def test_ring_window_bounds_and_push_many():
    ring = TimedRing(8, (3, 2), dtype=torch.float16)
    ring.push_many(np.arange(12) * 0.5, torch.arange(12.0).view(12, 1, 1).expand(12, 3, 2))
    assert len(ring) == 8                                              # 2.0 .. 5.5 kept
    items, times = ring.window(3.0, 4.0)                               # inclusive bounds
    assert times.tolist() == [3.0, 3.5, 4.0] and items[:, 0, 0].tolist() == [6, 7, 8]
    assert items.dtype == torch.float16 and items.shape == (3, 3, 2)
    assert ring.window(0.0, 1.9)[0].shape == (0, 3, 2)                 # overwritten
    assert ring.window(9.0, 10.0)[1].numel() == 0
    assert ring.window(-1, 100)[1].tolist() == [2.0 + 0.5 * i for i in range(8)]
    ring.push(5.5, torch.zeros(3, 2))                                  # equal time is fine
    with pytest.raises(ValueError, match="non-decreasing"):
        ring.push(5.0, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-decreasing"):
        ring.push_many([6.0, 5.9], torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        ring.push(7.0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="before"):
        ring.window(2.0, 1.0)
    ring.clear()
    assert len(ring) == 0 and ring.window(-math.inf, math.inf)[0].shape == (0, 3, 2)
    ring.push(0.0, torch.ones(3, 2))                                   # new timeline
    assert len(ring) == 1


def test_ring_memory_constant():
    ring = TimedRing(16, (9, 32))
    nbytes = ring.nbytes
    assert nbytes == 16 * 9 * 32 * 4 + 16 * 8
    for i in range(10 * 16):
        ring.push(float(i), torch.randn(9, 32))
    ring.push_many(np.arange(160, 200.0), torch.randn(40, 9, 32))
    assert ring.nbytes == nbytes and len(ring) == 16
    assert ring.latest(16)[1].tolist() == list(range(184, 200))
