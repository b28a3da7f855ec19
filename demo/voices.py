"""Who asks the questions: the question voices of each split (docs/DEMO_WORLD.md).

`QUESTION_VOICES` names the modes `run.py data --question-voice` offers:
- "espeak": espeak-ng voices only, every split (version 1: the shipped model's data). Train
  and val draw every English voice and variant not held out, the test split only held-out
  ones; rate USER_WPM, pitch USER_PITCH.
- "mix" (the default of `run.py data`): train and val draw from those espeak-ng voices and,
  with FLITE_SHARE, from flite's built-in voices (where the `flite` binary exists) at a
  changed rate (FLITE_STRETCH) and pitch (FLITE_F0_SCALE times the voice's own; rms keeps
  its own: flite ignores its pitch settings), with FESTIVAL_SHARE from Festival's English
  voices alike (where `text2wave` exists; the HTS voice keeps its own pitch); their
  sessions may sound in a room (demo/room.py). The test split is exactly "espeak"'s.
- "piper": the natural-voice test (issue 30): the test split's questions are spoken by
  Piper en_US-joe-medium. The scenes and questions are those "espeak" draws from the same
  seed (the held-out voice is drawn, then replaced), so the two test splits pair up turn by
  turn. Piper is never a question voice in train or val (`check_mode` refuses).
"""
from __future__ import annotations

import functools
import shutil

from speech.tts import (FESTIVAL_FIXED_PITCH, FESTIVAL_VOICES, FLITE_FIXED_PITCH, FLITE_VOICES,
                        FestivalVoice, FliteVoice, PiperVoice, Voice, list_english_voices,
                        list_variants)

# --- held out of train/val (test split only) ---------------------------------------------
HELDOUT_VOICE_NAMES = ("en-029", "en-gb-scotland")
HELDOUT_VARIANTS = ("Annie", "edward2", "f4", "iven2", "klatt4", "m6", "robosoft3", "steph3")

USER_WPM, USER_PITCH = (130, 200), (25, 75)       # espeak-ng rate and pitch of the questions
FLITE_SHARE = 0.2                  # "mix": share of train/val speakers that are flite voices
FLITE_STRETCH = (0.85, 1.25)       # flite duration_stretch: about USER_WPM (1.0 ~ 165 wpm)
FLITE_F0_HZ = {"awb": 128, "kal": 91, "kal16": 91, "slt": 170}   # measured means; rms: fixed pitch
FLITE_F0_SCALE = (0.85, 1.2)       # of the voice's own mean pitch
FESTIVAL_SHARE = 0.1               # "mix": share of train/val speakers that are Festival voices
FESTIVAL_F0_HZ = {"kal_diphone": 97, "ked_diphone": 100}   # measured means; HTS: fixed pitch
PIPER_QUESTION_VOICE = PiperVoice("en_US-joe-medium")   # the natural-voice test, never trained on
QUESTION_VOICES = {
    "mix": "train/val: espeak-ng voices + flite and Festival voices, rate and pitch changed, some in a "
           "reverberant room; test: held-out espeak-ng voices",
    "espeak": "espeak-ng voices only (version 1, the shipped model's data)",
    "piper": "the test split's questions spoken by Piper en_US-joe-medium (the natural-voice "
             "test; train and val must be empty)",
}
assert set(FLITE_F0_HZ) == set(FLITE_VOICES) - set(FLITE_FIXED_PITCH), (FLITE_F0_HZ, FLITE_VOICES)
assert set(FESTIVAL_F0_HZ) == set(FESTIVAL_VOICES) - set(FESTIVAL_FIXED_PITCH), FESTIVAL_F0_HZ


def check_mode(mode: str, split: str | None = None) -> str:
    """`mode` when it is a QUESTION_VOICES key allowed for `split`; else a ValueError that
    says what to do."""
    if mode not in QUESTION_VOICES:
        raise ValueError(f"the question voice must be one of {', '.join(QUESTION_VOICES)}, got "
                         f"{mode!r}")
    if mode == "piper" and split not in (None, "test"):
        raise ValueError(f"Piper en_US-joe-medium is the natural-voice test: it never speaks "
                         f"{split} questions. Render it as a test-only dataset: run.py data --out "
                         f"DIR --question-voice piper --train 0 --val 0")
    return mode


@functools.lru_cache(maxsize=None)
def voice_pool(heldout: bool) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """(espeak-ng voice names, variants) a split draws from; None = the plain voice."""
    names, variants = list_english_voices(), list_variants()
    if heldout:
        pool = (tuple(n for n in names if n in HELDOUT_VOICE_NAMES),
                tuple(v for v in variants if v in HELDOUT_VARIANTS))
    else:
        pool = (tuple(n for n in names if n not in HELDOUT_VOICE_NAMES),
                (None,) + tuple(v for v in variants if v not in HELDOUT_VARIANTS))
    if not pool[0] or not pool[1]:
        raise RuntimeError(f"espeak-ng lacks the voices needed (names {names}, variants "
                           f"{variants}); install Debian's espeak-ng (apt-get install "
                           f"espeak-ng)")
    return pool


def flite_pool() -> tuple[str, ...]:
    """flite's built-in voices where the `flite` binary exists (else none: "mix" then draws
    espeak-ng voices only; the manifest says which)."""
    return FLITE_VOICES if shutil.which("flite") else ()


def festival_pool() -> tuple[str, ...]:
    """Festival's English voices where `text2wave` exists (else none, as flite_pool)."""
    return FESTIVAL_VOICES if shutil.which("text2wave") else ()


def pools(mode: str) -> dict:
    """What each split of `mode` draws from, for the manifest."""
    names, variants = voice_pool(False)
    h_names, h_variants = voice_pool(True)
    train = {"espeak_ng": {"names": list(names), "variants": list(variants)}}
    if mode == "mix":
        train["flite"] = list(flite_pool())
        train["festival"] = list(festival_pool())
    test = ({"piper": [PIPER_QUESTION_VOICE.name]} if mode == "piper" else
            {"espeak_ng": {"names": list(h_names), "variants": list(h_variants)}})
    return {"train": train, "val": train, "test": test}


def sample_voice(rng, heldout: bool, mode: str = "espeak"
                 ) -> Voice | FliteVoice | FestivalVoice | PiperVoice:
    """One question voice. "espeak" draws exactly as version 1 did (same seeds, same voices)."""
    if mode == "mix" and not heldout:
        r = rng.random()
        for kind, pool, share, f0 in ((FliteVoice, flite_pool(), FLITE_SHARE, FLITE_F0_HZ),
                                      (FestivalVoice, festival_pool(), FESTIVAL_SHARE,
                                       FESTIVAL_F0_HZ)):
            if pool and r < share:
                name = pool[rng.integers(len(pool))]
                stretch = float(rng.uniform(*FLITE_STRETCH))
                scale = float(rng.uniform(*FLITE_F0_SCALE))
                return kind(name, round(stretch, 3), round(f0[name] * scale) if name in f0 else None)
            r -= share if pool else 0.0
    names, variants = voice_pool(heldout)
    voice = Voice(names[rng.integers(len(names))], variants[rng.integers(len(variants))],
                  int(rng.integers(USER_WPM[0], USER_WPM[1] + 1)),
                  int(rng.integers(USER_PITCH[0], USER_PITCH[1] + 1)))
    if mode == "piper":
        assert heldout, "Piper speaks test questions only"
        return PIPER_QUESTION_VOICE
    return voice
