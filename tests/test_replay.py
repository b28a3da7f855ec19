"""Recording (Recorder, run.py record) and replay (app.replay) on real speech (espeak-ng),
a tiny random agent, file-backed sources and a virtual sound card."""
import json
import os
import re
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
import torch

from app.agent import random_agent
from app.engine import EngineOptions, with_generation
from app.replay import TurnResult, replay
from app.replay_report import match_questions, normalize_text
from app.session import SessionWriter, load_session
from speech.constants import SAMPLE_RATE as SR
from tests.fixtures_audio import pulse_null_sink, speech_clips, synth_speech  # noqa: F401
from tests.media import make_test_video

REPO = Path(__file__).resolve().parents[1]
OPTS = with_generation(EngineOptions(), max_audio_seconds=1.0, max_text_tokens=6)


@pytest.fixture(scope="module")
def agent():
    return random_agent("tiny")


def _mic(seconds: float, clips) -> np.ndarray:
    """`seconds` of quiet noise with each (t, clip) added at t."""
    x = np.random.default_rng(0).normal(0, 1e-4, int(seconds * SR)).astype(np.float32)
    for t, c in clips:
        x[int(t * SR):int(t * SR) + len(c)] += c
    return x


def _image(k: int, size=(160, 120)) -> np.ndarray:
    img = np.full((size[1], size[0], 3), 30, np.uint8)
    cv2.circle(img, (10 + (7 * k) % (size[0] - 20), size[1] // 2), 10, (40, 40, 220), -1)
    return img


def _write_session(root, mic, fps=5, events=()):
    with SessionWriter(root, meta={"source": "test"}) as w:
        w.write_audio(mic)
        for k in range(int(len(mic) / SR * fps)):
            w.write_frame(k / fps, image=_image(k))
        for e in events:
            w.write_event(**e)
    return Path(root)


def _track(out: Path):
    x, sr = sf.read(str(out / "agent.wav"), dtype="float32")
    return x, sr


# --- replay --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_turns(tmp_path_factory, speech_clips, agent):
    a, b = speech_clips
    t_a, t_b = 0.8, 0.8 + len(a) / SR + 6.0
    mic = _mic(t_b + len(b) / SR + 4.0, [(t_a, a), (t_b, b)])
    questions = [dict(t=t_a, type="question", t_end=t_a + len(a) / SR, text="What is red?",
                      qtype="color", answer="Red."),
                 dict(t=t_b, type="question", t_end=t_b + len(b) / SR, text="Tell me.",
                      qtype="x", answer="a dog")]
    root = _write_session(tmp_path_factory.mktemp("s") / "two", mic, events=questions)
    out = tmp_path_factory.mktemp("out") / "replay"
    t0 = time.perf_counter()
    report = replay(root, out, agent, options=OPTS, progress=False)
    return root, out, report, (t_a, len(a) / SR), (t_b, len(b) / SR), time.perf_counter() - t0


def test_two_turn_replay_writes_a_consistent_report(two_turns, agent):
    root, out, report, (t_a, d_a), (t_b, d_b), _ = two_turns
    data = json.loads((out / "report.json").read_text())
    assert data["session"] == str(root) and data["model"] == agent.name
    assert data["mode"] == "mctp" and data["realtime"] is False and data["hardware"]
    turns = data["turns"]
    assert len(turns) == 2, turns
    for r, (t0, d) in zip(turns, [(t_a, d_a), (t_b, d_b)]):
        assert abs(r["speech_start"] - t0) < 0.3 and abs(r["speech_end"] - (t0 + d)) < 0.4, r
        assert r["speech_end"] < r["decision"] < r["first_audio"]
        assert r["response_latency"] == pytest.approx(r["first_audio"] - r["speech_end"])
        assert r["compute_latency"] >= 0 and r["generation_rtf"] > 0
        # the latency words: response = end-of-turn wait + compute on the virtual clock
        assert r["end_of_turn_wait"] == pytest.approx(r["decision"] - r["speech_end"])
        assert r["response_latency"] == pytest.approx(
            r["end_of_turn_wait"] + r["compute_latency"], abs=5e-3)
        assert r["text"] == "".join(r["tokens"]) and r["tokens"]
        assert not r["interrupted"] and r["played_seconds"] == pytest.approx(r["reply_seconds"])
        x, sr = sf.read(str(out / r["audio_file"]), dtype="float32")
        assert sr == agent.output_rate and len(x) / sr == pytest.approx(r["reply_seconds"])
        assert r["expected"] is not None and r["correct"] is False   # untrained: wrong
    assert [r["question"] for r in turns] == ["What is red?", "Tell me."]
    s = data["summary"]
    assert s["turns"] == 2 and s["questions"] == 2 and s["accuracy"] == 0.0
    lat = [r["response_latency"] for r in turns]
    assert s["response_latency"]["mean"] == pytest.approx(np.mean(lat))
    assert s["response_latency"]["median"] == pytest.approx(np.median(lat))
    assert s["reply_seconds"] == pytest.approx(sum(r["reply_seconds"] for r in turns))

    track, sr = _track(out)
    assert sr == agent.output_rate
    assert len(track) >= int(report.duration * sr)
    first = int(turns[0]["first_audio"] * sr)
    assert not track[:first].any(), "agent.wav must be silent before the first reply"
    for r in turns:
        i = int(round(r["first_audio"] * sr))
        assert np.abs(track[i:i + int(0.1 * sr)]).max() > 1e-3, r
    gap = slice(int(turns[1]["speech_start"] * sr), int(turns[1]["first_audio"] * sr))
    assert not track[gap].any(), "silent between a finished reply and the next one"

    summary = (out / "summary.txt").read_text()
    assert "response latency" in summary and turns[0]["text"][:20] in summary
    assert "end-of-turn wait  mean" in summary and "compute latency   mean" in summary
    assert "response latency = end of the user's speech to the first reply sound heard" in \
        " ".join(summary.split())
    assert s["end_of_turn_wait"]["mean"] == pytest.approx(
        np.mean([r["end_of_turn_wait"] for r in turns]))
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_replays_of_a_session_are_identical(two_turns, agent, tmp_path):
    root, out1, report1, *_ = two_turns
    report2 = replay(root, tmp_path / "again", agent, options=OPTS, progress=False)
    assert [t.tokens for t in report2.turns] == [t.tokens for t in report1.turns]
    assert [t.text for t in report2.turns] == [t.text for t in report1.turns]
    for t1, t2 in zip(report1.turns, report2.turns):
        a1, _ = sf.read(str(out1 / t1.audio_file), dtype="int16")
        a2, _ = sf.read(str(tmp_path / "again" / t2.audio_file), dtype="int16")
        np.testing.assert_array_equal(a1, a2)


def test_timeline_text_fits_in_the_figure(tmp_path):
    """Every caption, label and annotation of timeline.png lies inside the image (the x-axis
    key used to run past the right edge)."""
    from types import SimpleNamespace

    from matplotlib.text import Text

    from app.replay_report import plot_timeline
    sr = 16000
    session = SimpleNamespace(duration=8.0, audio=np.zeros(8 * sr, np.float32), sample_rate=sr,
                              root=tmp_path / "s", events=[
                                  {"t": 1.0, "type": "question", "t_end": 2.0, "text": "q"}])
    turns = [TurnResult(turn=1, speech_start=1.0, speech_end=2.0, decision=2.4, first_audio=2.6,
                        response_latency=0.6, compute_latency=0.2, generation_rtf=2.0,
                        reply_seconds=0.5, played_seconds=0.5, text="red.", tokens=["red."],
                        audio_file=None, interrupted=False, interrupted_at=None,
                        backbone_forwards=3, end_of_turn_wait=0.4)]
    fig = plot_timeline(tmp_path / "t.png", session, [[1.0, 2.0]], turns,
                        np.zeros(8 * sr, np.float32), sr)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()
    W, H = fig.bbox.width, fig.bbox.height
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert any("compute latency" in t.get_text() for t in texts)
    for t in texts:
        b = t.get_window_extent(renderer)
        assert b.x0 >= -1 and b.y0 >= -1 and b.x1 <= W + 1 and b.y1 <= H + 1, (t.get_text(), b)
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_ground_truth_matching_and_normalisation():
    assert normalize_text("  The RED circle.") == "the red circle"
    assert normalize_text("on the  left!") == normalize_text("On the left")
    turns = [TurnResult(turn=i + 1, speech_start=s, speech_end=e, decision=e + 0.4,
                        first_audio=None, response_latency=None, compute_latency=None,
                        generation_rtf=None, reply_seconds=0, played_seconds=0, text=text,
                        tokens=[], audio_file=None, interrupted=False, interrupted_at=None,
                        backbone_forwards=0)
             for i, (s, e, text) in enumerate([(1.0, 2.0, " Red."), (5.1, 6.0, "yes"),
                                               (9.0, 9.5, "two")])]
    events = [{"t": 0.9, "type": "question", "t_end": 2.1, "text": "q1", "answer": "red."},
              {"t": 4.0, "type": "scene"},
              {"t": 5.0, "type": "question", "t_end": 6.1, "text": "q2", "answer": "no."}]
    match_questions(turns, events)
    assert [(t.question, t.expected, t.correct) for t in turns] == [
        ("q1", "red.", True), ("q2", "no.", False), (None, None, None)]


def test_a_session_written_by_another_program_replays(tmp_path, speech_clips, agent):
    root = tmp_path / "foreign"
    (root / "pics").mkdir(parents=True)
    (root / "session.json").write_text(json.dumps(
        {"format": "tandem-session", "version": 1, "created": "2024-01-01T00:00:00Z",
         "writer": "someone else"}))
    a, _ = speech_clips
    mono = _mic(len(a) / SR + 3.0, [(0.7, a)])
    import torchaudio.functional as AF
    x = AF.resample(torch.from_numpy(mono), SR, 44_100).numpy()
    sf.write(str(root / "mic.wav"), np.stack([x, 0.5 * x], 1), 44_100, subtype="PCM_16")
    with open(root / "frames.jsonl", "w") as f:
        for k in range(int(len(mono) / SR * 4)):
            cv2.imwrite(str(root / "pics" / f"f{k}.jpg"), _image(k, (200, 150)))
            f.write(json.dumps({"t": k / 4, "file": f"pics/f{k}.jpg", "camera": "usb",
                                "exposure": 0.01}) + "\n")
    report = replay(root, tmp_path / "out", agent, options=OPTS, progress=False)
    assert len(report.turns) == 1
    t = report.turns[0]
    assert abs(t.speech_end - (0.7 + len(a) / SR)) < 0.4 and t.first_audio > t.speech_end
    assert (tmp_path / "out" / "report.json").is_file()


def test_barge_in_cuts_the_reply_in_agent_wav(tmp_path, speech_clips, agent):
    a, b = speech_clips
    t_b = 0.5 + len(a) / SR + 0.9      # the user talks again while the reply would play
    mic = _mic(t_b + len(b) / SR + 4.0, [(0.5, a), (t_b, b)])
    root = _write_session(tmp_path / "barge", mic)
    opts = with_generation(OPTS, max_audio_seconds=3.0, max_text_tokens=4)
    report = replay(root, tmp_path / "out", agent, options=opts, progress=False)
    assert len(report.turns) == 2, report.turns
    r1, r2 = report.turns
    assert r1.interrupted and not r2.interrupted
    assert r1.interrupted_at == pytest.approx(r2.speech_start, abs=0.05)
    assert r1.played_seconds < r1.reply_seconds
    track, sr = _track(tmp_path / "out")
    cut, nxt = int(round(r1.interrupted_at * sr)), int(round(r2.first_audio * sr))
    assert not track[cut:nxt].any(), "silent from the interrupt until the next reply"
    assert np.abs(track[nxt:nxt + int(0.1 * sr)]).max() > 1e-3
    assert r1.first_audio < r1.interrupted_at, r1   # it had started playing: audible until the cut
    i = int(round(r1.first_audio * sr))
    assert np.abs(track[i:cut]).max() > 1e-3
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "[interrupted]" in summary


def test_realtime_replay_can_be_recorded(tmp_path, speech_clips, agent):
    a, _ = speech_clips
    mic = _mic(0.4 + len(a) / SR + 2.5, [(0.4, a)])
    q = dict(t=0.4, type="question", t_end=0.4 + len(a) / SR, text="q", qtype="x", answer="y")
    root = _write_session(tmp_path / "rt", mic, events=[q])
    t0 = time.perf_counter()
    report = replay(root, tmp_path / "out", agent, realtime=True, options=OPTS,
                    progress=False, record=tmp_path / "rec")
    assert time.perf_counter() - t0 >= len(mic) / SR - 0.05      # paced at the recorded speed
    assert report.realtime and len(report.turns) == 1
    t = report.turns[0]
    assert t.first_audio > t.decision > t.speech_end and t.compute_latency >= 0
    rec = load_session(tmp_path / "rec")
    assert rec.meta["source"] == "replay" and rec.meta["duration"] >= len(mic) / SR
    assert len(rec.audio) == len(mic) and len(rec.frames) == len(load_session(root).frames)
    types = [e["type"] for e in rec.events]
    for ty in ("question", "speech_start", "speech_end", "turn_end", "reply_text", "turn_done"):
        assert ty in types, (ty, types)
    done = next(e for e in rec.events if e["type"] == "turn_done")["metrics"]
    assert done["text"] == t.text and done["first_audio"] == pytest.approx(t.first_audio)


# --- run.py record ---------------------------------------------------------------------------
def _run_py(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "run.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k != "PULSE_SERVER"}
    return {**env, "OMP_NUM_THREADS": "1", **kw}


def test_record_without_camera_or_microphone_says_what_to_do(tmp_path):
    r = _run_py("record", tmp_path / "a", "--camera", "63", "--seconds", "1", env=_env())
    assert r.returncode != 0
    assert "could not open camera device 63" in r.stderr and "--camera" in r.stderr, r.stderr
    r = _run_py("record", tmp_path / "c", "--camera", "none", "--input-device",
                "no-such-microphone", "--seconds", "1", env=_env())
    assert r.returncode != 0, r.stderr
    assert "no-such-microphone" in r.stderr and "--input-device" in r.stderr, r.stderr
    assert not (tmp_path / "c").exists(), "nothing is written when a device is missing"


def test_record_from_files_for_n_seconds(tmp_path, speech_clips):
    video = make_test_video(tmp_path / "cam.avi", seconds=1.0, fps=10)
    sf.write(str(tmp_path / "mic.wav"), _mic(6.0, [(0.3, speech_clips[0])]), SR)
    r = _run_py("record", tmp_path / "s", "--camera", video, "--input-device",
                tmp_path / "mic.wav", "--seconds", "1.5", env=_env())
    assert r.returncode == 0, r.stderr
    assert "1.5 s recorded" in r.stderr and "run.py replay" in r.stderr
    s = load_session(tmp_path / "s")
    assert abs(len(s.audio) / SR - 1.5) < 0.05 and s.meta["duration"] >= 1.5
    assert 10 <= len(s.frames) <= 20 and s.read_frame(0).shape == (240, 320, 3)


def _wait_recorded(proc, seconds: float, timeout: float) -> float:
    """Read the recorder's status lines (stderr) until it reports `seconds` recorded."""
    deadline, line = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 0.5)[0]:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            m = re.match(r"recording\s+([0-9.]+) s", line)
            if m and float(m.group(1)) >= seconds:
                return float(m.group(1))
    proc.kill()
    pytest.fail(f"the recorder did not report {seconds} s in time; last line {line!r}, "
                f"rc {proc.poll()}")


def test_sigkilled_recording_with_agent_still_replays(tmp_path, speech_clips, agent):
    from fusion.checkpoint import save_model
    from speech.codec import save_codec
    save_model(agent.model, tmp_path / "m" / "tiny.safetensors")
    save_codec(agent.codec, tmp_path / "m" / agent.model.config.codec.name)
    video = make_test_video(tmp_path / "cam.avi", seconds=1.0, fps=10)
    sf.write(str(tmp_path / "mic.wav"), _mic(20.0, [(0.3, speech_clips[0])]), SR)
    proc = subprocess.Popen(
        [sys.executable, "run.py", "record", str(tmp_path / "s"), "--agent", "--model",
         str(tmp_path / "m" / "tiny.safetensors"), "--camera", str(video), "--input-device",
         str(tmp_path / "mic.wav")], cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        killed_at = _wait_recorded(proc, 4.5, timeout=90)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    s = load_session(tmp_path / "s")
    assert "duration" not in s.meta                       # never finalised
    assert len(s.audio) / SR >= killed_at - 1.0, (len(s.audio) / SR, killed_at)
    assert len(s.frames) >= 20
    assert "turn_end" in [e["type"] for e in s.events]    # the engine's events were recorded
    report = replay(tmp_path / "s", tmp_path / "out", agent, options=OPTS, progress=False)
    assert (tmp_path / "out" / "report.json").is_file()
    assert report.duration >= killed_at - 1.0
    assert len(report.turns) == 1 and report.turns[0].first_audio is not None


def test_record_from_a_virtual_sound_card_until_sigterm(tmp_path, pulse_null_sink):
    video = make_test_video(tmp_path / "cam.avi", seconds=1.0, fps=10)
    speech = tmp_path / "speech.wav"
    synth_speech("Is there a green square on the left?", tmp_path, "speech")
    proc = subprocess.Popen(
        [sys.executable, "run.py", "record", str(tmp_path / "s"), "--camera", str(video),
         "--input-device", pulse_null_sink.device, "--output-device", pulse_null_sink.device],
        cwd=REPO,
        env=_env(PULSE_SERVER=pulse_null_sink.server), stderr=subprocess.PIPE, text=True)
    player = None
    try:
        _wait_recorded(proc, 0.5, timeout=60)
        player = subprocess.Popen(["paplay", "--server", pulse_null_sink.server, "--device",
                                   pulse_null_sink.sink, str(speech)])
        _wait_recorded(proc, 3.5, timeout=60)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
        if player is not None:
            player.kill()
    assert proc.returncode == 0, rest
    assert "stopped" in rest and "run.py replay" in rest
    s = load_session(tmp_path / "s")
    assert s.meta["duration"] >= 3.5 and s.meta["camera"] == str(video)   # finalised
    assert len(s.frames) >= 20
    assert np.abs(s.audio).max() > 0.01, "the speech played into the sink was recorded"


# --- bad session content -------------------------------------------------------------------
def _small_session(root) -> Path:
    return _write_session(root, _mic(3.0, []), fps=5)


def _replay_ok(root, out, agent):
    report = replay(root, out, agent, options=OPTS, progress=False)
    track, sr = _track(out)
    assert len(track) <= (3.0 + 2.0) * sr, "agent.wav sized by the session's real length"
    return report


def test_undecodable_frame_is_skipped_with_a_warning(tmp_path, agent):
    root = _small_session(tmp_path / "s")
    (root / "frames/000003.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 30 + b"\xff\xd9")
    report = _replay_ok(root, tmp_path / "out", agent)
    assert any("frames/000003.jpg" in w and "not decodable" in w for w in report.warnings)


@pytest.mark.parametrize("name,t", [("frames.jsonl", 1e9), ("events.jsonl", 3600.0),
                                    ("events.jsonl", -5.0)])
def test_times_beyond_the_session_are_dropped_with_a_warning(tmp_path, agent, name, t):
    root = _small_session(tmp_path / "s")
    line = {"t": t, "file": "frames/000001.jpg"} if name == "frames.jsonl" else \
        {"t": t, "type": "question", "text": "late?"}
    with open(root / name, "a") as f:
        f.write(json.dumps(line) + "\n")
    s = load_session(root)
    assert s.duration == pytest.approx(3.0, abs=0.01)
    assert any(name in w and f"t={t:g}" in w and "outside the session" in w for w in s.warnings)
    report = _replay_ok(root, tmp_path / "out", agent)
    assert report.duration == pytest.approx(3.0, abs=0.01)


def _set_wav_rate(path: Path, rate: int) -> None:
    b = bytearray(path.read_bytes())
    i = b.index(b"fmt ") + 8
    b[i + 4:i + 8] = rate.to_bytes(4, "little")
    b[i + 8:i + 12] = (rate * 2).to_bytes(4, "little")       # byte rate
    path.write_bytes(bytes(b))


def test_mic_wav_at_an_impossible_rate_is_one_clear_error(tmp_path):
    from app.session import SessionError
    root = _small_session(tmp_path / "s")
    _set_wav_rate(root / "mic.wav", 1)
    with pytest.raises(SessionError) as e:
        load_session(root)
    assert "mic.wav" in str(e.value) and "1 Hz" in str(e.value)
    r = subprocess.run([sys.executable, "run.py", "replay", str(root), "--random",
                        "--out", str(tmp_path / "out"), "--no-progress"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mic.wav" in lines[0] and "1 Hz" in lines[0], r.stderr


def test_mic_wav_cut_short_replays_with_a_warning(tmp_path, agent):
    root = _small_session(tmp_path / "s")
    data = (root / "mic.wav").read_bytes()
    (root / "mic.wav").write_bytes(data[:len(data) // 2])
    s = load_session(root)
    assert len(s.audio) == pytest.approx(1.5 * SR, abs=50)
    w = [w for w in s.warnings if "mic.wav" in w and "cut short" in w]
    assert w and "3.00 s" in w[0] and "1.50 s" in w[0], s.warnings
    report = replay(root, tmp_path / "out", agent, options=OPTS, progress=False)
    assert any("cut short" in w for w in report.warnings)


def test_a_session_without_audio_is_refused_by_replay(tmp_path, agent):
    from app.session import SessionError
    root = _small_session(tmp_path / "s")
    (root / "mic.wav").unlink()
    with pytest.raises(SessionError, match="no audio"):
        replay(root, tmp_path / "out", agent, options=OPTS, progress=False)
    r = subprocess.run([sys.executable, "run.py", "replay", str(root), "--random",
                        "--out", str(tmp_path / "out"), "--no-progress"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "no audio" in r.stderr
