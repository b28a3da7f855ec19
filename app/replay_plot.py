"""timeline.png for a replay: mic waveform with VAD speech spans and ground-truth questions,
the agent's voice, turn markers (end of speech -> first reply audio) and latencies."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _envelope(x: np.ndarray, sr: int, bins: int = 4000):
    """(times, lo, hi): min/max per bin, so long sessions plot fast and look right."""
    n = max(1, len(x) // bins)
    m = len(x) // n
    if m == 0:
        return np.zeros(1), np.zeros(1), np.zeros(1)
    y = x[:m * n].reshape(m, n)
    return (np.arange(m) * n + n / 2) / sr, y.min(1), y.max(1)


def plot_timeline(path: Path, session, speech: list, turns: list, track: np.ndarray,
                  sr: int) -> None:
    from matplotlib.figure import Figure     # no pyplot: no GUI backend, no global state

    dur = max(session.duration, len(track) / sr, 1e-3)
    fig = Figure(figsize=(max(8.0, min(24.0, dur / 2.5)), 5.0), dpi=100)
    ax_mic, ax_agent = fig.subplots(2, 1, sharex=True)
    t, lo, hi = _envelope(session.audio, session.sample_rate)
    ax_mic.fill_between(t, lo, hi, color="0.35", lw=0, label="mic")
    for i, (a, b) in enumerate(speech):
        ax_mic.axvspan(a, dur if b is None else b, color="tab:green", alpha=0.18,
                       label="VAD speech" if i == 0 else None)
    qs = [e for e in session.events if e["type"] == "question" and "t_end" in e]
    for i, q in enumerate(qs):
        ax_mic.hlines(-0.95, q["t"], q["t_end"], color="tab:purple", lw=3,
                      label="question (ground truth)" if i == 0 else None)
    t, lo, hi = _envelope(track, sr)
    ax_agent.fill_between(t, lo, hi, color="tab:blue", lw=0, label="agent")
    for r in turns:
        if r.first_audio is not None:
            ax_agent.axvspan(r.speech_end, r.first_audio, color="tab:red", alpha=0.08, lw=0)
        ax_agent.axvline(r.decision, color="0.5", ls=":", lw=1)
        for ax in (ax_mic, ax_agent):
            ax.axvline(r.speech_end, color="tab:orange", ls="--", lw=1)
            if r.first_audio is not None:
                ax.axvline(r.first_audio, color="tab:red", lw=1)
        label = f"T{r.turn}"
        if r.response_latency is not None:
            label += f"\n{r.response_latency * 1000:.0f} ms"
            if r.compute_latency is not None:
                label += f"\n(compute {r.compute_latency * 1000:.0f})"
        ax_agent.annotate(label, (r.speech_end, 0.95), xycoords=("data", "axes fraction"),
                          va="top", ha="right", fontsize=7)
        if r.interrupted and r.interrupted_at is not None:
            ax_agent.plot([r.interrupted_at], [0], "x", color="crimson", ms=9, mew=2,
                          label="barge-in cut")
    for ax, name in ((ax_mic, "microphone"), (ax_agent, "agent voice")):
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel(name)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            uniq = dict(zip(labels, handles))
            ax.legend(uniq.values(), uniq.keys(), loc="upper right", fontsize=7)
    ax_agent.set_xlim(0, dur)
    ax_agent.set_xlabel("session time (s)   dashed: end of user speech, dotted: end-of-turn "
                        "decision, red: first reply audio (shaded: response latency)")
    fig.suptitle(f"{Path(str(session.root)).name}: {len(turns)} turns", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))
