"""Stage 1a: pretrain the from-scratch encoders on auxiliary labels of the demo world.

Vision: per frame, what sits in each slot and whether it pulses. `slot_heads="joint"` is one
head over the 13 classes (empty + 12 colour-shape pairs); "factorised" is one colour head and
one shape head (each with "empty"). The test split holds out some (colour, shape, slot)
triples, and the joint head learns "never a green triangle on the right" (frozen features + a
linear probe: held-out triples 0-12% right, the others 97-99%). Factorised heads, an encoder
without a position embedding and frames shifted sideways by up to `shift_px` (within the slot,
so no held-out triple is ever shown) read them 98-99%; see CONTRIBUTING.
Audio: per encoder frame of a 1 s chunk, beep pitch (none/low/high) and speech; per question,
which words it holds (a bag, from the mean over frames) and, with `question_heads`, which
colour, shape and slot word, each read by its own attention over the frames. With the bag
alone, an attention probe on the frozen features reads the colour word of held-out voices'
questions 85.6% of the time; with the heads 95.6% (`lab/probes/question_probe.py`).
Cheap, direct supervision, so the encoders are good before they are frozen and their features
cached for the later stages. The heads are thrown away.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from speech.constants import QUESTION_PAD, SAMPLE_RATE, SCENE_CHUNK_SAMPLES
from speech.whisper_encoder import log_mel
from vision.encoder import preprocess

from demo import world as W
from fusion.layers import column_means, masked_mean
from .trainset import (BEEP_CLASSES, OBJECT_CLASSES, audio_frame_labels, frame_labels, question_gaps,
                       question_vocab, words_of)


SLOT_HEADS = ("joint", "factorised")
ENCODER_PARTS = ("audio", "vision")
QUESTION_WORDS = (tuple(W.COLORS), W.SHAPES, W.SLOTS)   # read by the question heads
MAX_SHIFT_PX = 40.0     # at 320x240 a slot is ~107 px wide and slot centres are 96 px apart


def check_encoder_parts(parts) -> None:
    if not parts or set(parts) - set(ENCODER_PARTS):
        raise ValueError(f"encoder_parts must be a non-empty subset of {ENCODER_PARTS}, got {parts!r}")


def check_shift_px(shift_px: float) -> None:
    if not 0 <= shift_px <= MAX_SHIFT_PX:
        raise ValueError(f"shift_px must be in [0, {MAX_SHIFT_PX:g}] (px at 320x240; a slot is ~107 px "
                         f"wide), got {shift_px}")


def augment_frame(img: np.ndarray, rng, shift_px: float = 0.0) -> np.ndarray:
    """A rendered BGR frame as pretraining sees it: shifted sideways by up to `shift_px` (px at
    320x240, edge pixels repeated; within the slot, so the object stays where it is said to be),
    then through JPEG at a random quality (60-95), as a camera's frames come."""
    if shift_px > 0:
        dx = float(rng.uniform(-shift_px, shift_px)) * img.shape[1] / W.REF_W
        img = cv2.warpAffine(img, np.float32([[1, 0, dx], [0, 1, 0]]), img.shape[1::-1],
                             borderMode=cv2.BORDER_REPLICATE)
    ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 96))])
    assert ok, "cv2.imencode failed on a rendered frame"
    return cv2.imdecode(jpg, cv2.IMREAD_COLOR)


def _mel_hz(n_mels: int) -> np.ndarray:
    """Approximate centre frequencies (Hz) of Whisper's mel bins (0-8 kHz, HTK mel scale)."""
    m = np.linspace(0, 2595 * np.log10(1 + 8000 / 700), n_mels + 2)[1:-1]
    return 700 * (10 ** (m / 2595) - 1)


def augment_question(audio: np.ndarray, rng, n_mels: int) -> torch.Tensor:
    """A question's log-mel as voice-augmented pretraining sees it: speed perturbed by 0.9-1.1x
    (pitch and formants move together), its spectral envelope warped by 0.88-1.12x
    (vocal-tract length) and two bands of up to 8 mel bins masked: voices the training split
    never has. The words, and so the labels, stay."""
    r = float(rng.uniform(0.9, 1.1))
    x = np.interp(np.arange(0, len(audio) - 1, r), np.arange(len(audio)), audio).astype(np.float32)
    mel = log_mel(x, n_mels).numpy()                                  # (n_mels, T)
    hz = _mel_hz(n_mels)
    src = np.interp(hz / float(rng.uniform(0.88, 1.12)), hz, np.arange(n_mels))  # bin read per bin
    lo = np.floor(src).astype(int).clip(0, n_mels - 2)
    w = (src - lo).clip(0, 1)[:, None]
    mel = (1 - w) * mel[lo] + w * mel[lo + 1]
    fill = float(mel.mean())
    for _ in range(2):
        wdt = int(rng.integers(0, 9))
        f0 = int(rng.integers(0, n_mels - wdt + 1))
        mel[f0:f0 + wdt] = fill
    return torch.from_numpy(mel.astype(np.float32))


class EncoderPretrainer(nn.Module):
    def __init__(self, model, slot_heads: str = "joint", parts: tuple[str, ...] = ENCODER_PARTS,
                 question_heads: bool = False):
        super().__init__()
        if slot_heads not in SLOT_HEADS:
            raise ValueError(f"slot_heads must be one of {SLOT_HEADS}, got {slot_heads!r}")
        check_encoder_parts(parts)
        self.parts = tuple(parts)
        c = model.config
        self.audio_encoder, self.vision_encoder = model.audio_encoder, model.vision_encoder
        self.vocab = question_vocab()
        cols, rows = c.vision.grid
        assert cols == 3, ("the slot head needs 3 token columns (left/middle/right)", c.vision.grid)
        self.rows = rows
        Dv, Da = c.vision.width, c.audio.n_state
        # targets per head: OBJECT_CLASSES index -> class of that head (0 = empty)
        colour = [0] + [1 + list(W.COLORS).index(n.split()[0]) for n in OBJECT_CLASSES[1:]]
        shape = [0] + [1 + list(W.SHAPES).index(n.split()[1]) for n in OBJECT_CLASSES[1:]]
        maps = ([list(range(len(OBJECT_CLASSES)))] if slot_heads == "joint" else [colour, shape])
        self.head_sizes = [max(m) + 1 for m in maps]
        for i, m in enumerate(maps):
            self.register_buffer(f"_target{i}", torch.tensor(m), persistent=False)
        self.slot_head = nn.Linear(Dv, sum(self.head_sizes) + 1)  # the heads' classes + pulse logit
        self.beep_head = nn.Linear(Da, len(BEEP_CLASSES) + 1)    # classes + speech logit
        self.word_head = nn.Linear(Da, len(self.vocab))
        # which colour / shape / slot word the question holds (or none), each read by its own
        # attention over the question's frames: the word, not the whole utterance, must carry it
        self.question_heads = question_heads
        if question_heads:
            self.q_attn = nn.Linear(Da, len(QUESTION_WORDS))
            self.q_heads = nn.ModuleList(nn.Linear(Da, len(ws) + 1) for ws in QUESTION_WORDS)
            for i, ws in enumerate(QUESTION_WORDS):
                self.register_buffer(f"_qwords{i}", torch.tensor([self.vocab.index(w) for w in ws]),
                                     persistent=False)

    def forward(self, images, slot_cls, slot_pulse, mel, beep, speech, q_mel, q_len, q_words):
        out = {}
        if "vision" in self.parts:
            out.update(self._vision(images, slot_cls, slot_pulse))
        if "audio" in self.parts:
            out.update(self._audio(mel, beep, speech, q_mel, q_len, q_words))
        out["loss"] = sum(out.pop(k) for k in [k for k in out if k.startswith("loss_")])
        return out

    def _vision(self, images, slot_cls, slot_pulse):
        # (B, 3, H, W) -> (B, rows*3, Dv) -> per column mean -> (B, 3, Dv)
        v = column_means(self.vision_encoder(images), self.rows)
        out = self.slot_head(v)                                         # (B, 3, classes + 1)
        l_obj, right, i0 = 0.0, torch.ones_like(slot_cls, dtype=torch.bool), 0
        for i, n in enumerate(self.head_sizes):
            logits, target = out[..., i0:i0 + n], getattr(self, f"_target{i}")[slot_cls]  # (B, 3, n)
            l_obj = l_obj + F.cross_entropy(logits.flatten(0, 1), target.flatten())
            right &= logits.argmax(-1) == target
            i0 += n
        l_pulse = F.binary_cross_entropy_with_logits(out[..., -1], slot_pulse.float())
        return {"loss_vision": l_obj + 0.5 * l_pulse, "obj": l_obj.detach(),
                "acc_obj": right.float().mean().detach()}

    def _audio(self, mel, beep, speech, q_mel, q_len, q_words):
        # audio chunks: (B, n_mels, 100) -> (B, 50, Da)
        a = self.beep_head(self.audio_encoder(mel))                    # (B, 50, 4)
        l_beep = F.cross_entropy(a[..., :-1].flatten(0, 1), beep.flatten())
        l_speech = F.binary_cross_entropy_with_logits(a[..., -1], speech.float())
        # questions: padded mel + lengths -> mean over valid frames -> word bag
        q = self.audio_encoder(q_mel, q_len)                           # (B, Tq, Da)
        n = self.audio_encoder.output_lengths(q_len)                   # valid encoder frames
        valid = torch.arange(q.shape[1], device=q.device)[None] < n[:, None]            # (B, Tq)
        pooled = masked_mean(q, valid)
        l_words = F.binary_cross_entropy_with_logits(self.word_head(pooled), q_words)
        out = {"beep": l_beep.detach(), "words": l_words.detach()}
        loss = l_beep + 0.5 * l_speech + l_words
        if self.question_heads:
            att = self.q_attn(q).masked_fill(~valid[..., None], float("-inf")).softmax(1)  # (B, Tq, K)
            read = torch.einsum("btk,btd->bkd", att, q)                               # (B, K, Da)
            l_q = 0.0
            for i, head in enumerate(self.q_heads):
                present = q_words[:, getattr(self, f"_qwords{i}")]                   # (B, n)
                target = torch.where(present.any(1), present.argmax(1) + 1, 0)
                l_q = l_q + F.cross_entropy(head(read[:, i]), target)
            out["qwords"] = l_q.detach()
            loss = loss + l_q
        return {"loss_audio": loss, **out}


def question_audio(mic: np.ndarray, rng, tr) -> np.ndarray:
    """A turn's question as the engine hands it on: VAD-like jitter on its bounds and a
    hesitation's pause cut out where the engine cuts it (`trainset.question_gaps`)."""
    q0 = max(0.0, tr.t_q0 - QUESTION_PAD + rng.uniform(-0.05, 0.05))
    q1 = tr.t_q1 + rng.uniform(-0.05, 0.05)
    qa = mic[int(q0 * SAMPLE_RATE):int(q1 * SAMPLE_RATE)]
    for a, b in reversed(question_gaps(rng, tr)):
        a, b = (int((min(max(t, q0), q1) - q0) * SAMPLE_RATE) for t in (a, b))
        qa = np.concatenate([qa[:a], qa[b:]])
    return qa


class AuxBatches:
    """Random auxiliary batches rendered on the fly from the training shards (seeded).
    `shift_px`: frames shifted sideways by up to this many px (at 320x240; the edge pixels
    repeat). `voice_aug`: questions through `augment_question`. Parts not in `parts` get empty
    tensors, and their rendering is skipped."""

    def __init__(self, shards, vision_config, vocab: list[str], n_mels: int, seed: int = 0,
                 rank: int = 0, *, shift_px: float = 0.0, voice_aug: bool = False,
                 parts: tuple[str, ...] = ENCODER_PARTS):
        check_shift_px(shift_px)
        check_encoder_parts(parts)
        self.shards, self.vc, self.vocab, self.n_mels = shards, vision_config, vocab, n_mels
        self.seed, self.rank, self.shift, self.parts = seed, rank, shift_px, parts
        self.voice_aug = voice_aug

    def _frame(self, rng, spec, tr):
        # a frame, biased towards pulses half of the time
        if tr.scene.pulses and rng.random() < 0.5:
            p = tr.scene.pulses[int(rng.integers(len(tr.scene.pulses)))]
            t = p.t0 + rng.uniform(0, p.dur)
        else:
            t = rng.uniform(max(0.0, tr.t_scene - 1.0), tr.t_next)
        img = augment_frame(W.render_frame(spec, t), rng, self.shift)
        c, pl = frame_labels(W.scene_at(spec, t)[1], t)
        return img, c, pl

    def __call__(self, step: int, batch: int, device):
        rng = np.random.default_rng((self.seed, self.rank, step))
        sh = self.shards
        imgs, cls, pulse, mels, beeps, speech, qmels, qlens, qwords = ([] for _ in range(9))
        for _ in range(batch):
            s = int(rng.integers(sh.n_sessions))
            spec = sh.specs[s]
            tr = spec.turns[int(rng.integers(len(spec.turns)))]
            if "vision" in self.parts:
                img, c, pl = self._frame(rng, spec, tr)
                imgs.append(img), cls.append(c), pulse.append(pl)
            if "audio" not in self.parts:
                continue
            # a 1 s audio chunk on the session's chunk grid, biased towards beeps
            mic = sh.mic(s)
            if tr.scene.beeps and rng.random() < 0.6:
                k = int(tr.scene.beeps[int(rng.integers(len(tr.scene.beeps)))].t0)
            else:
                k = int(rng.integers(max(1, len(mic) // SCENE_CHUNK_SAMPLES)))
            chunk = mic[k * SCENE_CHUNK_SAMPLES:(k + 1) * SCENE_CHUNK_SAMPLES]
            chunk = np.pad(chunk, (0, SCENE_CHUNK_SAMPLES - len(chunk)))
            mels.append(log_mel(chunk, self.n_mels))
            b, sp = audio_frame_labels(spec, float(k), 50)
            beeps.append(b), speech.append(sp)
            qa = question_audio(mic, rng, tr)
            qm = augment_question(qa, rng, self.n_mels) if self.voice_aug else log_mel(qa, self.n_mels)
            qmels.append(qm), qlens.append(qm.shape[1])
            words = set(words_of(tr.question.text))
            qwords.append([1.0 if w in words else 0.0 for w in self.vocab])
        t = lambda x, dt=torch.long: torch.as_tensor(np.asarray(x), dtype=dt).to(device)  # noqa: E731
        none = torch.zeros(0, device=device)
        vision = (preprocess(imgs, self.vc).to(device), t(cls), t(pulse)) if imgs else (none,) * 3
        if not qmels:
            return (*vision, *(none,) * 6)
        qmel = torch.zeros(batch, self.n_mels, max(qlens))
        for i, m in enumerate(qmels):
            qmel[i, :, :m.shape[1]] = m
        return (*vision, torch.stack(mels).to(device), t(beeps), t(speech), qmel.to(device),
                t(qlens), t(qwords, torch.float32))
