"""Replay outputs beyond the raw audio: ground-truth matching, summary statistics, the
printed table and timeline.png (mic waveform with VAD speech spans and ground-truth questions,
the agent's voice, turn markers and latencies)."""
from __future__ import annotations

import os
import re
import string
import textwrap
from pathlib import Path

import numpy as np

from demo.replies import answer_right

from .frames import LATENCY_WORDS, TURN_END_REASONS, latency_legend


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: "The Red circle." -> "the red circle"."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def match_questions(turns: list, events: list[dict]) -> None:
    """Each turn gets the ground-truth question whose speech span overlaps it most."""
    qs = [e for e in events if e["type"] == "question" and isinstance(e.get("t_end"), (int, float))]
    for r in turns:
        best, overlap = None, 0.0
        for q in qs:
            o = min(r.speech_end, q["t_end"]) - max(r.speech_start, q["t"])
            if o > overlap:
                best, overlap = q, o
        if best is not None:
            r.question, r.expected, r.qtype = best.get("text"), best.get("answer"), best.get("qtype")
            if isinstance(r.expected, str):
                r.correct = answer_right(r.text, r.expected, r.qtype)


def _stats(values) -> dict | None:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return None
    return {"mean": float(v.mean()), "median": float(np.median(v)),
            "p90": float(np.percentile(v, 90)), "min": float(v.min()), "max": float(v.max())}


def summarize(turns: list, s) -> dict:
    questions = [e for e in s.events if e["type"] == "question"]
    scored = [r for r in turns if r.correct is not None]
    return {
        "turns": len(turns),
        "replies_with_audio": sum(r.first_audio is not None for r in turns),
        "interrupted": sum(r.interrupted for r in turns),
        "response_latency": _stats(r.response_latency for r in turns),
        "end_of_turn_wait": _stats(r.end_of_turn_wait for r in turns),
        "compute_latency": _stats(r.compute_latency for r in turns),
        "turn_end": {k: sum(getattr(r, "turn_end", None) == k for r in turns)
                     for k in TURN_END_REASONS},
        "discarded_starts": sum(getattr(r, "discarded_starts", 0) for r in turns),
        "generation_rtf": _stats(r.generation_rtf for r in turns),
        "reply_seconds": sum(r.reply_seconds for r in turns),
        "played_seconds": sum(r.played_seconds for r in turns),
        "questions": len(questions),
        "scored_turns": len(scored),
        "correct": sum(bool(r.correct) for r in scored),
        "accuracy": (sum(bool(r.correct) for r in scored) / len(questions)) if questions else None,
    }


def hardware(agent) -> str:
    import torch
    dev = next(agent.model.parameters()).device
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    from .host import cpu_name
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


def _f(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(r) -> str:
    clock = "real time" if r.realtime else "virtual clock"
    lines = [f"replay of {r.session}", f"model {r.model} ({r.mode}, {clock}) on {r.hardware}",
             f"session {r.duration:.1f} s replayed in {r.wall_seconds:.1f} s wall", "",
             f"{'turn':>4} {'speech_end':>10} {'first_audio':>11} {'response':>8} {'wait':>5} "
             f"{'compute':>7} {'rtf':>5} {'reply_s':>7} {'ended_by':>11} {'disc':>4}  text"]
    for t in r.turns:
        note = " [interrupted]" if t.interrupted else ""
        if t.expected is not None:
            note += f"  expected {t.expected!r} {'ok' if t.correct else 'WRONG'}"
        text = t.text if len(t.text) <= 40 else t.text[:37] + "..."
        lines.append(f"{t.turn:>4} {t.speech_end:>10.2f} {_f(t.first_audio):>11} "
                     f"{_f(t.response_latency):>8} {_f(t.end_of_turn_wait):>5} "
                     f"{_f(t.compute_latency):>7} "
                     f"{_f(t.generation_rtf, '.1f'):>5} {t.reply_seconds:>7.2f} "
                     f"{getattr(t, 'turn_end', None) or '-':>11} {getattr(t, 'discarded_starts', 0):>4}"
                     f"  {text!r}{note}")
    if not r.turns:
        lines.append("   (no turns: no user speech was detected)")
    s = r.summary
    lines.append("")
    for key, (label, _) in LATENCY_WORDS.items():
        st = s.get(key)                     # reports written before end_of_turn_wait lack it
        lines.append(f"{label:<17} " + ("-" if st is None else
                     f"mean {st['mean']:.3f} s  median {st['median']:.3f} s  p90 {st['p90']:.3f} s"))
    if s.get("turn_end"):               # reports written before turn taking lack it
        lines.append("turns ended by " + ", ".join(f"{k} {v}" for k, v in s["turn_end"].items())
                     + f"; preemptive replies discarded {s.get('discarded_starts', 0)}")
    lines.append(f"turns {s['turns']}, interrupted {s['interrupted']}, reply audio "
                 f"{s['reply_seconds']:.1f} s (played {s['played_seconds']:.1f} s)")
    if s["questions"]:
        lines.append(f"ground truth: {s['correct']} of {s['questions']} questions answered "
                     f"correctly (accuracy {s['accuracy']:.2f})")
    lines += ["", textwrap.fill(latency_legend() + ("" if r.realtime else
              " (on the virtual clock no sound is played: first reply sound = first reply audio "
              "ready, so response latency = end-of-turn wait + compute latency)"), 100)]
    return "\n".join(lines)



def _envelope(x: np.ndarray, sr: int, bins: int = 4000):
    """(times, lo, hi): min/max per bin, so long sessions plot fast and look right."""
    n = max(1, len(x) // bins)
    m = len(x) // n
    if m == 0:
        return np.zeros(1), np.zeros(1), np.zeros(1)
    y = x[:m * n].reshape(m, n)
    return (np.arange(m) * n + n / 2) / sr, y.min(1), y.max(1)


def plot_timeline(path: Path, session, speech: list, turns: list, track: np.ndarray,
                  sr: int):
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
        ax_agent.axvspan(r.speech_end, r.decision, color="tab:orange", alpha=0.12, lw=0,
                         label=f"{LATENCY_WORDS['end_of_turn_wait'][0]}")
        if r.first_audio is not None:
            ax_agent.axvspan(r.decision, r.first_audio, color="tab:red", alpha=0.12, lw=0,
                             label=f"{LATENCY_WORDS['compute_latency'][0]}")
        ax_agent.axvline(r.decision, color="0.5", ls=":", lw=1)
        for ax in (ax_mic, ax_agent):
            ax.axvline(r.speech_end, color="tab:orange", ls="--", lw=1)
            if r.first_audio is not None:
                ax.axvline(r.first_audio, color="tab:red", lw=1)
        label = f"T{r.turn}"
        if r.response_latency is not None:
            label += f"\nresponse {r.response_latency * 1000:.0f} ms"
            if r.end_of_turn_wait is not None:
                label += f"\nwait {r.end_of_turn_wait * 1000:.0f}"
            if r.compute_latency is not None:
                label += f"\ncompute {r.compute_latency * 1000:.0f}"
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
            ax.legend(uniq.values(), uniq.keys(), loc="upper right" if ax is ax_mic else "best",
                      fontsize=7)
    ax_agent.set_xlim(0, dur)
    ax_agent.set_xlabel("session time (s)")
    # the key under the axes, wrapped to the figure: it used to run past the right edge
    key = ("dashed: end of the user's speech · dotted: end-of-turn decision · red: first reply "
           "audio. Response latency (dashed to red) = end-of-turn wait (orange shade) + compute "
           "latency (red shade).")
    width_chars = int(fig.get_figwidth() * 100 / 6.2)   # ~6.2 px per character at 8 pt
    fig.text(0.01, 0.01, textwrap.fill(key, width_chars), fontsize=8, ha="left", va="bottom")
    fig.suptitle(f"{Path(str(session.root)).name}: {len(turns)} turns", fontsize=10)
    n_lines = textwrap.fill(key, width_chars).count("\n") + 1
    fig.tight_layout(rect=(0, 0.01 + 0.035 * n_lines, 1, 1))
    fig.savefig(str(path), bbox_inches="tight", pad_inches=0.1)
    return fig
