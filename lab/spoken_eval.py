"""Spoken replies, judged (evaluation only; `lab.eval` calls it for every reply it scores).

- Heard right by the slot rule: the independent recogniser's transcript of the reply audio
  carries the expected answer's slot values (`demo.replies.slot_match`), so a sentence heard
  as "The square is green" is right for the answer "green." as the text scorer counts it.
- Word error rate of that transcript against the reply's own text (right or wrong): how
  intelligible the voice is. Word-level Levenshtein over `demo.replies.words` ("2" is "two");
  rates pool the errors and reference words of all replies (corpus WER).
- DNSMOS P.835 (SIG speech, BAK background, OVRL overall; 1-5) of the reply audio, with the
  ONNX model that ships inside `speechmos` (no network), scored as `speechmos.dnsmos` scores
  it. speechmos's own module also imports librosa (for its P.808 score, unused here), so the
  model is run directly with onnxruntime on one CPU thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from demo.replies import slot_rule, words
from speech.constants import SAMPLE_RATE

DNSMOS_RATE = 16_000                     # Hz: the DNSMOS models take 16 kHz audio only
DNSMOS_WINDOW = 9.01                     # s scored at once (speechmos.dnsmos.INPUT_LENGTH)
DNSMOS_KEYS = ("ovrl", "sig", "bak")
# speechmos.dnsmos.DNSMOS.get_polyfit_val (not personalised): raw model output -> MOS
_DNSMOS_POLY = {"sig": (-0.08397278, 1.22083953, 0.0052439),
                "bak": (-0.13166888, 1.60915514, -0.39604546),
                "ovrl": (-0.06766283, 1.11546468, 0.04602535)}
DNSMOS_HELP = ("DNSMOS needs speechmos (its ONNX models ship inside the wheel) and onnxruntime: "
               "pip install speechmos==0.0.1.1 onnxruntime (both via requirements-dev.txt)")


# --- word error rate --------------------------------------------------------------------------
@dataclass(frozen=True)
class WordErrors:
    """Edit operations turning the reference words into the hypothesis words."""
    substitutions: int
    insertions: int
    deletions: int
    reference_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.insertions + self.deletions

    @property
    def rate(self) -> float | None:
        """Word error rate; None for an empty reference (nothing to get wrong)."""
        return self.errors / self.reference_words if self.reference_words else None


def word_errors(reference: str, hypothesis: str) -> WordErrors:
    """Word-level Levenshtein alignment of `hypothesis` to `reference` after `words`
    normalisation (lower case, no punctuation, digits as number words); among alignments
    of least cost, the one with the most substitutions (the usual WER convention)."""
    ref, hyp = words(reference), words(hypothesis)
    # cell: (cost, -substitutions, insertions, deletions); min() picks the least cost first
    row = [(j, 0, j, 0) for j in range(len(hyp) + 1)]
    for i, r in enumerate(ref, 1):
        cur = [(i, 0, 0, i)]
        for j, h in enumerate(hyp, 1):
            c, s, n_ins, n_del = row[j - 1]
            diag = (c, s, n_ins, n_del) if r == h else (c + 1, s - 1, n_ins, n_del)
            c, s, n_ins, n_del = row[j]
            dele = (c + 1, s, n_ins, n_del + 1)
            c, s, n_ins, n_del = cur[j - 1]
            ins = (c + 1, s, n_ins + 1, n_del)
            cur.append(min(diag, dele, ins))
        row = cur
    cost, neg_sub, n_ins, n_del = row[-1]
    assert cost == -neg_sub + n_ins + n_del, (cost, neg_sub, n_ins, n_del)
    return WordErrors(-neg_sub, n_ins, n_del, len(ref))


def pooled_rate(errs) -> float | None:
    """Corpus word error rate: all errors over all reference words (None when none)."""
    errs = [e for e in errs if e is not None]
    n = sum(e.reference_words for e in errs)
    return sum(e.errors for e in errs) / n if n else None


# --- DNSMOS -----------------------------------------------------------------------------------
class Dnsmos:
    """DNSMOS P.835 of speechmos's packaged ONNX model. `score(audio, rate)` -> {"ovrl",
    "sig", "bak"} (1-5), or None for empty audio. As speechmos does, a clip shorter than the
    9.01 s window is doubled until it fills it, and longer ones are scored in 9.01 s windows
    1 s apart and averaged."""

    def __init__(self, threads: int = 1):
        import importlib.util
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(DNSMOS_HELP) from e
        spec = importlib.util.find_spec("speechmos")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(DNSMOS_HELP)
        path = Path(list(spec.submodule_search_locations)[0]) / "dnsmos_models" / "sig_bak_ovr.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall speechmos "
                                    f"(pip install --force-reinstall speechmos==0.0.1.1)")
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def score(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict | None:
        from speech.resample import resample_whole
        x = np.asarray(audio, np.float32)
        assert x.ndim == 1, x.shape                                    # mono (T,)
        if x.size == 0:
            return None
        x = np.clip(resample_whole(x, sample_rate, DNSMOS_RATE), -1.0, 1.0)
        n = int(DNSMOS_WINDOW * DNSMOS_RATE)
        while len(x) < n:
            x = np.concatenate([x, x])
        raw = []
        for i in range(int(np.floor(len(x) / DNSMOS_RATE) - DNSMOS_WINDOW) + 1):
            seg = x[int(i * DNSMOS_RATE): int((i + DNSMOS_WINDOW) * DNSMOS_RATE)]   # speechmos's bounds:
            if len(seg) >= n:                           # float rounding drops some windows there
                raw.append(self.session.run(None, {self.input: seg[None]})[0][0])   # (3,) sig, bak, ovr
        sig, bak, ovr = np.asarray(raw, np.float64).T                   # each (windows,)
        return {k: float(np.mean(np.poly1d(_DNSMOS_POLY[k])(v)))
                for k, v in (("ovrl", ovr), ("sig", sig), ("bak", bak))}


def load_dnsmos() -> Dnsmos:
    try:
        return Dnsmos(threads=1)
    except (ImportError, FileNotFoundError) as e:
        raise type(e)(f"{e} (or evaluate without it: --no-dnsmos)") from e


# --- per reply and per question type ----------------------------------------------------------
def heard_right(transcript: str, expected: str, qtype) -> bool | None:
    """The slot rule on the recogniser's transcript; None where it does not apply (a question
    type the demo world does not have, or an expected answer naming no slot value)."""
    return slot_rule(transcript, expected, qtype)


def judge_reply(rec: dict, transcript: str | None, audio16k: np.ndarray, dnsmos: Dnsmos | None) -> None:
    """Adds to an eval record (qtype, expected, text): `heard_slots` and `word_errors` (dict
    of `WordErrors`; None when the reply has no text) when there is a transcript, and
    `dnsmos` when a scorer is given."""
    if transcript is not None:
        rec["heard_slots"] = heard_right(transcript, rec["expected"], rec["qtype"])
        e = word_errors(rec["text"], transcript)
        rec["word_errors"] = None if e.reference_words == 0 else vars(e).copy()
    if dnsmos is not None:
        rec["dnsmos"] = dnsmos.score(audio16k, SAMPLE_RATE)


def _cell(rs: list) -> dict:
    def mean(vals):
        v = [float(x) for x in vals if x is not None]
        return sum(v) / len(v) if v else None
    errs = [WordErrors(**r["word_errors"]) for r in rs if r.get("word_errors")]
    return {"n": len(rs), "heard_slots": mean(r.get("heard_slots") for r in rs),
            "wer": pooled_rate(errs), "wer_replies": len(errs),
            "dnsmos": {k: mean((r.get("dnsmos") or {}).get(k) for r in rs) for k in DNSMOS_KEYS}}


def spoken_summary(records: list) -> dict:
    """Heard right (slot rule), pooled WER and mean DNSMOS of the scored replies, overall
    ("overall") and per question type ("by_type")."""
    return {"overall": _cell(records),
            "by_type": {q: _cell([r for r in records if r["qtype"] == q])
                        for q in sorted({r["qtype"] for r in records if r.get("qtype")})}}
