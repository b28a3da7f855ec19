"""`python run.py data`: render the demo world's datasets (docs/DEMO_WORLD.md).

```
OUT/
  manifest.json   options, counts, seed, held-out sets, reply version ("replies": v1 phrases or
                  v2 sentences; a manifest without it is v1), question voices per split,
                  espeak-ng (flite, piper) version, content hash
  answers/        the agent's spoken replies in the data's version (DataOptions.agent_voice,
                  default AGENT_VOICE, 16 kHz) + answers.json text -> file
  codec/          agent-voice sentences for codec training: train/*.wav, eval/*.wav,
                  sentences.json {"train": [{"file", "text"}], "eval": [...]}
  train/          sessions.jsonl (one SessionSpec per line) + mic.npy (int16, all sessions
                  concatenated) + index.json (offsets, reply version); frames are rendered on
                  the fly
  val/, test/     NNNNN/ session directories (DESIGN.md format), 10 fps JPEG frames
```
The questions' voices (DataOptions.question_voice, demo/voices.py): "mix" (default) draws
train/val speakers from espeak-ng, flite and Festival with rate and pitch changed, some in a room;
"espeak" is version 1's; "piper" renders a test-only natural-voice split (Piper
en_US-joe-medium, never a train or val voice). Session events carry each question's reply
text in the data's version ("reply") beside its version-1 "answer".

Session i of a split is sampled from `np.random.default_rng([seed, split_id, i])`, so a
rerun with the same options (and espeak-ng/torchaudio versions) is byte-identical except
for the "created" time stamps in session.json.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import shutil
import struct
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from demo import world as W
from demo.replies import all_reply_texts, check_version, reply_text, words
from demo.voices import check_mode, festival_pool, flite_pool, pools
from speech.constants import DEMO_WORLD_FPS, PCM16_MAX, SAMPLE_RATE
from speech.tts import AGENT_VOICE, parse_voice, voice_spec

SPLIT_ID = {"train": 0, "val": 1, "test": 2}
OWNED = ("manifest.json", "answers", "codec", "train", "val", "test")


@dataclass(frozen=True)
class DataOptions:
    n_train_sessions: int = 700
    n_val_sessions: int = 12
    n_test_sessions: int = 25
    turns_per_session: int = 8
    seed: int = 0
    workers: int = 2
    n_codec_sentences: int = 1500      # codec training sentences (answers included)
    n_codec_eval: int = 100            # held-out codec sentences (no answer text among them)
    agent_voice: str = voice_spec(AGENT_VOICE)   # the answers' and codec corpus' voice (tts.parse_voice)
    hesitation_prob: float = 0.0       # questions spoken with a pause (version 2: 0.25; 0 = none)
    replies: str = "v2"                # the page's version of the replies (and questions' wording)
    question_voice: str = "mix"        # who asks: demo.voices.QUESTION_VOICES ("piper": test only)

    def __post_init__(self):
        for name, lo in (("n_train_sessions", 0), ("n_val_sessions", 0),
                         ("n_test_sessions", 0), ("turns_per_session", 1), ("seed", 0),
                         ("workers", 1), ("n_codec_sentences", 0), ("n_codec_eval", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"DataOptions.{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.hesitation_prob, (int, float)) or isinstance(
                self.hesitation_prob, bool) or not 0.0 <= self.hesitation_prob <= 1.0:
            raise ValueError(f"DataOptions.hesitation_prob must be a number in [0, 1] (the "
                             f"page's version 2 uses 0.25), got {self.hesitation_prob!r}")
        check_version(self.replies)
        check_mode(self.question_voice)
        for split, n in (("train", self.n_train_sessions), ("val", self.n_val_sessions)):
            if n:
                check_mode(self.question_voice, split)     # Piper asks test questions only
        # raises ValueError with the accepted forms; one spelling per voice ("en-us+m3" -> "en-us+m3:165:50")
        object.__setattr__(self, "agent_voice", voice_spec(parse_voice(self.agent_voice)))


# --- the agent-voice corpus ----------------------------------------------------------------
_TIMES = ("once", "twice", "three times")


def codec_sentences(seed: int, n_train: int, n_eval: int,
                    replies: str = "v1") -> tuple[list[str], list[str]]:
    """Distinct sentences in the world's vocabulary: (train, eval). Train starts with every
    reply text of version `replies`; eval holds none of them (nor any sentence with the same
    words, case and punctuation aside) and shares no sentence with train."""
    cs = [(c, s) for c in W.COLORS for s in W.SHAPES]
    pool = {q.text for qt in W.QTYPES for c, s in cs for p in W.SLOTS for q in
            W.candidate_questions(_probe_scene(c, s, p), qt)}
    for (c, s) in cs:
        for p in W.SLOTS:
            pool |= {f"the {c} {s} is on the {p}.", f"I see a {c} {s} on the {p}.",
                     f"the {s} on the {p} is {c}.", f"yes, the {c} {s} on the {p}."}
            pool |= {f"the {c} {s} on the {p} beeped {x}, {hl}." for x in _TIMES
                     for hl in ("high", "low")}
        pool |= {f"no, the {c} {s} was silent.", f"it was the {c} {s}.",
                 f"the {c} {s} beeped.", f"I heard the {c} {s}."}
        pool |= {f"a {c} {s} and a {c2} {s2}." for c2, s2 in cs if (c2, s2) != (c, s)}
        pool |= {f"a {c} {s}, a {c2} {s2} and a {c3} {s3}." for c2, s2 in cs
                 for c3, s3 in cs if len({(c, s), (c2, s2), (c3, s3)}) == 3}
        pool |= {f"I see a {c} {s} on the {p} and a {c2} {s2} on the {p2}." for p in W.SLOTS
                 for c2, s2 in cs for p2 in W.SLOTS if p2 != p}
    pool |= {f"I heard {n} {hl} beeps." for n in ("two", "three") for hl in ("high", "low")}
    pool |= {f"there are {n} objects." for n in ("two", "three")}
    answers = list(all_reply_texts(replies))
    said = {tuple(words(a)) for a in answers}
    rest = sorted(t for t in pool if tuple(words(t)) not in said)
    np.random.default_rng([seed, 3]).shuffle(rest)
    if n_eval + max(0, n_train - len(answers)) > len(rest):
        raise ValueError(f"the world's vocabulary has {len(rest) + len(answers)} distinct "
                         f"sentences; ask for at most that many codec sentences in total")
    evals, rest = rest[:n_eval], rest[n_eval:]
    return (answers + rest)[:n_train], evals


def _probe_scene(c: str, s: str, p: str) -> W.Scene:
    bg = W.Background("flat", (0, 0, 0), (0, 0, 0), 0, 0)
    obj = W.WorldObject(s, c, p, W.COLORS[c], 60.0, 120.0)
    return W.Scene(bg, (obj,), (W.Beep(0.0, 0.25, 450.0, -15.0),), (), p)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# --- workers (top level: picklable) --------------------------------------------------------
def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)        # resampling is tiny; threads only fight over 2 cores


def _speak_to_wav(job) -> float:
    import soundfile as sf
    from speech.tts import synthesize
    text, path, voice = job
    x = synthesize(text, voice, SAMPLE_RATE)
    sf.write(path, x, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return len(x) / SAMPLE_RATE


def split_rules(o: DataOptions, split: str) -> W.SplitRules:
    """What a split of the data `o` describes draws from (hesitations, question voices, the
    page's version of the questions)."""
    return W.SplitRules(split, hesitation_prob=o.hesitation_prob, voices=o.question_voice,
                        version=o.replies)


def _make_session(job: tuple[int, str, int, int, str, W.SplitRules, str]):
    from speech.audio import float_to_pcm16
    seed, split, i, n_turns, out, rules, replies = job
    rng = np.random.default_rng([seed, SPLIT_ID[split], i])
    spec = W.sample_session(rng, n_turns, rules)
    audio = W.render_audio(spec, W.question_audio(spec))
    if split == "train":
        return json.dumps(spec.to_dict(), separators=(",", ":")), float_to_pcm16(audio)
    write_session(Path(out) / split / f"{i:05d}", spec, audio,
                  {"world": "demo", "split": split, "seed": seed, "session_index": i},
                  replies=replies)
    return None, None


def write_session(root, spec: W.SessionSpec, audio: np.ndarray, meta: dict,
                  replies: str | None = None) -> None:
    """One session directory: mic.wav, 10 fps frames, per-turn ground-truth events (with
    `replies`, each question's reply text in that version too)."""
    from app.session import SessionWriter
    with SessionWriter(root, sample_rate=SAMPLE_RATE,
                       meta={**meta, "spec": spec.to_dict()}) as w:
        w.write_audio(audio)                          # first: no per-second fsyncs below
        k = 0
        while k / DEMO_WORLD_FPS < spec.duration:
            w.write_frame(k / DEMO_WORLD_FPS, image=W.render_frame(spec, k / DEMO_WORLD_FPS))
            k += 1
        for j, turn in enumerate(spec.turns):
            q = turn.question
            w.write_event(turn.t_scene, "scene", turn=j, scene=turn.scene.to_dict())
            h = turn.hesitation                       # the pause inside it, if any
            reply = {} if replies is None else {
                "reply": reply_text(q.qtype, q.text, q.answer, replies)}
            w.write_event(turn.t_q0, "question", turn=j, t_end=turn.t_q1, text=q.text,
                          qtype=q.qtype, group=q.type_group, answer=q.answer, **reply,
                          **({} if h is None else {"pause": [h.t0, h.t1],
                                                   "pause_after_words": h.words}))


# --- train shards --------------------------------------------------------------------------
def _npy_header(n: int) -> bytes:
    """A 128-byte .npy v1 header for an int16 vector of n samples (rewritten at the end)."""
    body = ("{'descr': '<i2', 'fortran_order': False, 'shape': (%d,), }" % n).ljust(117)
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + (body + "\n").encode("latin1")


class TrainShards:
    """The training split (OUT/train, or OUT): specs + memmapped mic audio; frames come
    from `render_frame(spec, t)`. `replies`: the version of the reply texts this data was
    rendered for (its index.json, else its manifest; data from before versions: "v1")."""

    def __init__(self, root):
        self.root = Path(root)
        if (self.root / "train" / "index.json").is_file():     # the dataset root given
            self.root = self.root / "train"
        if not (self.root / "index.json").is_file():
            raise FileNotFoundError(f"{self.root} has no index.json; generate the data with "
                                    f"`python run.py data`")
        self.index = json.loads((self.root / "index.json").read_text())
        self.sample_rate = int(self.index["sample_rate"])
        manifest = self.root.parent / "manifest.json"
        version = self.index.get("replies") or (json.loads(manifest.read_text()).get("replies")
                                                if manifest.is_file() else None)
        self.replies = check_version(version or "v1")
        with open(self.root / "sessions.jsonl") as f:
            self.specs = [W.SessionSpec.from_dict(json.loads(line)) for line in f]
        assert len(self.specs) == len(self.index["sessions"]), (len(self.specs),
                                                                 len(self.index["sessions"]))
        self._turns = [(i, j) for i, s in enumerate(self.specs) for j in range(len(s.turns))]
        self._mic = np.load(self.root / "mic.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self._turns)

    @property
    def n_sessions(self) -> int:
        return len(self.specs)

    def turn(self, i: int) -> tuple[W.SessionSpec, int]:
        """(the session's spec, the turn's index in it) of global turn i."""
        s, j = self._turns[i]
        return self.specs[s], j

    def session_of(self, i: int) -> int:
        """Session index of global turn i."""
        return self._turns[i][0]

    def reply(self, i: int, version: str | None = None) -> str:
        """The agent's reply text to global turn i, in `version` (default: this data's)."""
        spec, j = self.turn(i)
        q = spec.turns[j].question
        return reply_text(q.qtype, q.text, q.answer, version or self.replies)

    def mic(self, i_session: int) -> np.ndarray:
        """The session's microphone audio, float32 (T,) in [-1, 1]."""
        e = self.index["sessions"][i_session]
        return self._mic[e["offset"]:e["offset"] + e["length"]].astype(np.float32) / PCM16_MAX


# --- main ------------------------------------------------------------------------------------
def _hash_tree(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file() and x.name != "manifest.json"):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        if p.name == "session.json":              # its "created" stamp is wall-clock time
            meta = json.loads(p.read_bytes())
            meta.pop("created", None)
            h.update(hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).digest())
            continue
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                fh.update(block)
        h.update(fh.digest())
    return h.hexdigest()


def _tool_version(binary: str) -> str:
    try:
        lines = subprocess.run([binary, "--version"], capture_output=True,
                               text=True).stdout.strip().splitlines()
        return next((ln.strip() for ln in lines if "version:" in ln), lines[0])   # flite: 2nd line
    except (FileNotFoundError, IndexError):
        return "missing"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return "missing"


def generate(out_dir, options: DataOptions, *, progress: bool = True,
             overwrite: bool = False) -> dict:
    """Write the datasets described in the module docstring; returns the manifest."""
    from tqdm import tqdm
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose a new directory or pass "
                                  f"overwrite=True to replace its datasets")
        for name in OWNED:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for d in ("answers", "codec/train", "codec/eval", "train", "val", "test"):
        (out / d).mkdir(parents=True, exist_ok=True)
    o = options
    answers = {t: f"{_slug(t)}.wav" for t in all_reply_texts(o.replies)}
    tr_text, ev_text = codec_sentences(o.seed, o.n_codec_sentences, o.n_codec_eval, o.replies)
    codec = {"train": [{"file": f"train/{i:06d}.wav", "text": t} for i, t in enumerate(tr_text)],
             "eval": [{"file": f"eval/{i:06d}.wav", "text": t} for i, t in enumerate(ev_text)]}
    voice = parse_voice(o.agent_voice)
    speak = [(t, str(out / "answers" / f), voice) for t, f in answers.items()]
    speak += [(e["text"], str(out / "codec" / e["file"]), voice) for k in ("train", "eval")
              for e in codec[k]]
    jobs = [(o.seed, split, i, o.turns_per_session, str(out), split_rules(o, split), o.replies)
            for split, n in
            (("train", o.n_train_sessions), ("val", o.n_val_sessions),
             ("test", o.n_test_sessions)) for i in range(n)]
    counts = {s: {"sessions": 0, "turns": 0, "seconds": 0.0} for s in SPLIT_ID}
    index, offset = [], 0
    pool = None
    if o.workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(o.workers, _init_worker)
    mapper = (lambda f, xs: pool.imap(f, xs, chunksize=1)) if pool else map
    try:
        if pool is None:
            import torch
            threads = torch.get_num_threads()
            _init_worker()
        seconds = list(tqdm(mapper(_speak_to_wav, speak), total=len(speak),
                            desc="agent voice", disable=not progress))
        with open(out / "train" / "sessions.jsonl", "w") as specs_f, \
                open(out / "train" / "mic.npy", "wb") as mic_f:
            mic_f.write(_npy_header(0))
            for job, (spec_json, pcm) in zip(jobs, tqdm(mapper(_make_session, jobs),
                                                         total=len(jobs), desc="sessions",
                                                         disable=not progress)):
                split = job[1]
                counts[split]["sessions"] += 1
                counts[split]["turns"] += o.turns_per_session
                if spec_json is not None:
                    specs_f.write(spec_json + "\n")
                    mic_f.write(pcm.astype("<i2").tobytes())
                    index.append({"offset": offset, "length": len(pcm),
                                  "n_turns": o.turns_per_session})
                    offset += len(pcm)
                    counts[split]["seconds"] += len(pcm) / SAMPLE_RATE
            mic_f.seek(0)
            mic_f.write(_npy_header(offset))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        else:
            torch.set_num_threads(threads)
    (out / "train" / "index.json").write_text(json.dumps(
        {"format": "tandem-demo-train", "version": 1, "sample_rate": SAMPLE_RATE,
         "replies": o.replies, "sessions": index}, separators=(",", ":")))
    (out / "answers" / "answers.json").write_text(json.dumps(answers, indent=1))
    (out / "codec" / "sentences.json").write_text(json.dumps(
        {"sample_rate": SAMPLE_RATE, "voice": voice.to_dict(), "replies": o.replies, **codec},
        indent=1))
    for split in ("val", "test"):
        counts[split]["seconds"] = sum(json.loads((p / "session.json").read_text())
                                       ["spec"]["duration"] for p in (out / split).iterdir())
    manifest = {"format": "tandem-demo-data", "version": 1, "world": "demo",
                "seed": o.seed, "options": asdict(o), "counts": counts,
                "answers": len(answers), "replies": o.replies, "agent_voice": voice.to_dict(),
                "question_voice": o.question_voice, "question_voices": pools(o.question_voice),
                "codec": {"train": len(tr_text), "eval": len(ev_text),
                          "seconds": round(sum(seconds), 3)},
                "heldout": {"triples": W.HELDOUT_TRIPLES, "voices": W.HELDOUT_VOICE_NAMES,
                            "variants": W.HELDOUT_VARIANTS},
                "espeak_ng": _tool_version("espeak-ng"), "content_sha256": _hash_tree(out)}
    if o.agent_voice.startswith("flite:") or (o.question_voice == "mix" and flite_pool()):
        manifest["flite"] = _tool_version("flite")
    if o.agent_voice.startswith("festival:") or (o.question_voice == "mix" and festival_pool()):
        manifest["festival"] = _tool_version("festival")
    if o.agent_voice.startswith("piper:") or o.question_voice == "piper":
        manifest["piper"] = _package_version("piper-tts")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(out_dir, *, n_train_sessions: int = DataOptions.n_train_sessions,
         n_val_sessions: int = DataOptions.n_val_sessions,
         n_test_sessions: int = DataOptions.n_test_sessions,
         turns_per_session: int = DataOptions.turns_per_session, seed: int = 0,
         workers: int = 2, progress: bool = True,
         n_codec_sentences: int = DataOptions.n_codec_sentences,
         n_codec_eval: int = DataOptions.n_codec_eval,
         agent_voice: str = DataOptions.agent_voice, overwrite: bool = False,
         hesitation_prob: float = DataOptions.hesitation_prob,
         replies: str = DataOptions.replies,
         question_voice: str = DataOptions.question_voice) -> dict:
    """Entry point of `python run.py data OUT`; see `DataOptions` for the defaults."""
    opts = DataOptions(n_train_sessions, n_val_sessions, n_test_sessions, turns_per_session,
                       seed, workers, n_codec_sentences, n_codec_eval, agent_voice,
                       hesitation_prob, replies, question_voice)
    return generate(out_dir, opts, progress=progress, overwrite=overwrite)
