"""SceneEncoder: encodes scene audio and video as they arrive, so that at the end of a turn
only the question, the aggregator, the prefill and the first steps remain.

Microphone audio is encoded in fixed 1 s chunks aligned to the session clock (chunk i covers
[i, i+1) s); frames are encoded one by one. Both land in time-stamped rings of fixed size.
Offline use (training, replay, evaluation) feeds the same object, so there is one code path.
"""
from __future__ import annotations

import numpy as np
import torch

from speech.constants import (AUDIO_FEATURE_RATE, SAMPLE_RATE, SAMPLER_FPS,
                              SCENE_CHUNK_SAMPLES, SCENE_CHUNK_SECONDS)
from speech.whisper_encoder import log_mel
from vision.encoder import preprocess
from vision.ring import TimedRing

from .model import FusionModel, Prefix, SceneFeatures

_FEATS_PER_CHUNK = int(SCENE_CHUNK_SECONDS * AUDIO_FEATURE_RATE)  # 50


class SceneEncoder:
    """Streaming encoder for one session. `push_audio` takes 16 kHz mono float32 in any chunk
    sizes (the session clock is the count of samples pushed); `push_frame` takes one BGR frame
    with its session time. `features(q_t0, q_t1)` assembles one turn's inputs."""

    def __init__(self, model: FusionModel, history_seconds: float | None = None,
                 max_fps: float = 2 * SAMPLER_FPS):
        self.model = model
        c = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.history = history_seconds or (c.context_seconds + 4.0)
        n_chunks = int(np.ceil(self.history / SCENE_CHUNK_SECONDS)) + 1
        self.audio_ring = TimedRing(n_chunks * _FEATS_PER_CHUNK, (c.audio.n_state,), self.dtype, self.device)
        self.frame_ring = TimedRing(int(self.history * max_fps) + 1, (c.vision.n_tokens, c.vision.width),
                                    self.dtype, self.device)
        # raw audio kept for the question and the current partial chunk: a fixed ring too
        self._pcm = np.zeros(int(self.history * SAMPLE_RATE) + SCENE_CHUNK_SAMPLES, np.float32)
        self.samples = 0          # total samples pushed (session clock * SAMPLE_RATE)
        self._encoded = 0         # samples covered by encoded chunks

    @property
    def now(self) -> float:
        return self.samples / SAMPLE_RATE

    def reset(self):
        self.reset_to(0)

    def reset_to(self, sample: int):
        """Forgets everything and restarts the clock at `sample` (a chunk boundary): offline
        use skips stretches of a session that no turn needs."""
        assert sample % SCENE_CHUNK_SAMPLES == 0, (sample, SCENE_CHUNK_SAMPLES)
        self.audio_ring.clear()
        self.frame_ring.clear()
        self.samples = self._encoded = sample

    # --- input ------------------------------------------------------------------------------
    @torch.inference_mode()
    def push_audio(self, pcm: np.ndarray) -> int:
        """Appends audio; encodes every chunk that became complete. Returns chunks encoded."""
        pcm = np.asarray(pcm, np.float32)
        if pcm.ndim != 1:
            raise ValueError(f"SceneEncoder takes mono 16 kHz audio of shape (T,), got {pcm.shape}; "
                             "average the channels with speech.audio.to_mono")
        n = len(self._pcm)
        for start in range(0, len(pcm), n):  # a push longer than the ring is fed in slices
            part = pcm[start:start + n]
            idx = (self.samples + np.arange(len(part))) % n
            self._pcm[idx] = part
            self.samples += len(part)
        n_new = (self.samples - self._encoded) // SCENE_CHUNK_SAMPLES
        if n_new:  # every chunk completed by this push, encoded as one batch
            starts = [self._encoded + i * SCENE_CHUNK_SAMPLES for i in range(n_new)]
            mel = torch.stack([log_mel(self._audio(s0, s0 + SCENE_CHUNK_SAMPLES), self.model.config.audio.n_mels)
                               for s0 in starts]).to(self.device, self.dtype)     # (n, n_mels, 100)
            feats = self.model.encode_audio(mel)                                   # (n, 50, Da)
            for s0, f in zip(starts, feats):
                self.audio_ring.push_many(self._feat_times(s0, len(f)), f)
            self._encoded += n_new * SCENE_CHUNK_SAMPLES
        done = n_new
        return done

    @torch.inference_mode()
    def push_frame(self, t: float, image: np.ndarray) -> None:
        self.push_frames([t], [image])

    @torch.inference_mode()
    def push_frames(self, times: list[float], images: list[np.ndarray]) -> None:
        """Encodes frames (in time order) as one batch."""
        if not images:
            return
        x = preprocess(list(images), self.model.config.vision).to(self.device, self.dtype)
        self.frame_ring.push_many(torch.as_tensor(times, dtype=torch.float64), self.model.encode_frames(x))

    # --- one turn -----------------------------------------------------------------------------
    @torch.inference_mode()
    def features(self, q_t0: float, q_t1: float, gaps=()) -> SceneFeatures:
        """Inputs for a question spoken over [q_t0, q_t1] (session seconds); the context is the
        `context_seconds` before q_t1. Audio of a chunk still incomplete is encoded here; so is
        the question, in one call, unless `question_chunks` takes it from the chunks. `gaps`:
        (t0, t1) pauses inside the question (the user hesitated) left out of the question."""
        c = self.model.config
        if not 0 <= q_t0 < q_t1 <= self.now + 1e-6:
            raise ValueError(f"question span [{q_t0:.3f}, {q_t1:.3f}] s must lie within the audio "
                             f"pushed so far [0, {self.now:.3f}] s")
        q_t0 = max(q_t0, q_t1 - c.max_question_seconds)
        gaps = sorted((max(a, q_t0), min(b, q_t1)) for a, b in gaps if min(b, q_t1) > max(a, q_t0))
        s0, s1 = int(round(q_t0 * SAMPLE_RATE)), int(round(q_t1 * SAMPLE_RATE))
        t_lo = q_t1 - c.context_seconds
        a, at = self.audio_ring.window(t_lo, q_t1)
        end = min(s1, self.samples)
        tail = None
        if self._encoded < end:  # the chunk holding the end of the question is not complete yet
            tail = self._encode_audio(self._audio(self._encoded, end))
            tt = torch.as_tensor(self._feat_times(self._encoded, len(tail)), dtype=at.dtype)
            a = torch.cat([a, tail]) if len(a) else tail
            at = torch.cat([at, tt]) if len(at) else tt
        question = None
        if c.question_chunks:  # the scene audio's chunks, encoded as the question was spoken
            question, qt = self.audio_ring.window(q_t0, q_t1)                       # (Tq, Da)
            if tail is not None:
                question = torch.cat([question, tail[tt >= q_t0]])
                qt = torch.cat([qt, tt[tt >= q_t0]])
            for a_, b_ in gaps:
                keep = (qt < a_) | (qt >= b_)
                question, qt = question[keep], qt[keep]
            question = question if len(question) else None   # shorter than one frame
        if question is None:  # the whole question in one call, at the turn end
            if gaps:
                cuts = [s0] + [int(round(t * SAMPLE_RATE)) for g in gaps for t in g] + [s1]
                question = self._encode_audio(np.concatenate(
                    [self._audio(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]))
            else:
                question = self._encode_audio(self._audio(s0, s1))                  # (Tq, Da)
        v, vt = self.frame_ring.window(t_lo, q_t1)
        dev = self.device
        return SceneFeatures(
            question=question[None],
            question_len=torch.tensor([len(question)], device=dev),
            audio=a[None].to(dev, self.dtype),
            audio_times=(at.to(dev).float() - q_t1)[None],
            audio_mask=torch.ones(1, len(a), dtype=torch.bool, device=dev),
            frames=v[None].to(dev, self.dtype),
            frame_times=(vt.to(dev).float() - q_t1)[None],
            frame_mask=torch.ones(1, len(v), dtype=torch.bool, device=dev),
        )

    @torch.inference_mode()
    def prefix(self, q_t0: float, q_t1: float) -> Prefix:
        return self.model.prefix(self.features(q_t0, q_t1))

    # --- pieces ---------------------------------------------------------------------------------
    def _audio(self, s0: int, s1: int) -> np.ndarray:
        n = len(self._pcm)
        if s1 - s0 > n or s0 < self.samples - n:
            raise ValueError(f"audio [{s0 / SAMPLE_RATE:.2f}, {s1 / SAMPLE_RATE:.2f}] s is no longer "
                             f"held (history {self.history:.1f} s)")
        return self._pcm[np.arange(s0, s1) % n]

    def _encode_audio(self, pcm: np.ndarray) -> torch.Tensor:
        if len(pcm) < 2 * SAMPLE_RATE // AUDIO_FEATURE_RATE:  # shorter than one encoder frame
            pcm = np.pad(pcm, (0, 2 * SAMPLE_RATE // AUDIO_FEATURE_RATE - len(pcm)))
        mel = log_mel(pcm, self.model.config.audio.n_mels).to(self.device, self.dtype)  # (n_mels, T)
        return self.model.encode_audio(mel[None])[0]                                    # (T/2, Da)

    @staticmethod
    def _feat_times(s0: int, n: int) -> np.ndarray:
        """Centre time of each encoder frame of audio starting at sample s0."""
        return (s0 / SAMPLE_RATE) + (np.arange(n) + 0.5) / AUDIO_FEATURE_RATE
