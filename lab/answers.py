"""Scoring replies and listing a split's sessions, shared by the engine evaluation
(`lab.eval`) and the text-only ablations (`lab.ablations`)."""
from __future__ import annotations

from pathlib import Path

from demo.replies import answer_right
from speech.recognizer import normalize_text as _words


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, numbers as words: "The 2 red." -> "the two red"."""
    return " ".join(_words(text))


def answers_match(reply: str, expected: str, qtype: str | None = None) -> bool:
    """DEMO_WORLD.md's slot rule where the question type is known (a version-1 phrase and a
    version-2 sentence score alike: "The square is green." answers "green."); otherwise the
    normalised texts equal (`demo.replies.answer_right`)."""
    return answer_right(reply, expected, qtype)


def accuracy_table(records: list[dict]) -> dict:
    """records: dicts with qtype, group, correct -> overall / by_group / by_type accuracy."""
    def acc(rs):
        return {"accuracy": (sum(bool(r["correct"]) for r in rs) / len(rs)) if rs else None, "n": len(rs)}
    out = {"overall": acc(records)["accuracy"], "n": len(records), "by_group": {}, "by_type": {}}
    for key, name in (("group", "by_group"), ("qtype", "by_type")):
        for v in sorted({r[key] for r in records}):
            out[name][v] = acc([r for r in records if r[key] == v])
    if any(r.get("heldout_triple") is not None for r in records):
        out["by_scene"] = {k: acc([r for r in records if r.get("heldout_triple") is v])
                           for k, v in (("held-out triple", True), ("seen triples only", False))}
    return out


def session_dirs(data, split: str, max_sessions: int | None = None) -> list[Path]:
    root = Path(data) / split
    dirs = sorted(p for p in root.iterdir() if (p / "session.json").is_file()) if root.is_dir() else []
    if not dirs:
        raise FileNotFoundError(f"no sessions under {root}: render the demo world with "
                                f"`python run.py data --out {data}`")
    return dirs[:max_sessions] if max_sessions else dirs


def question_events(session) -> list[dict]:
    return [e for e in session.events if e["type"] == "question" and isinstance(e.get("t_end"), (int, float))]
