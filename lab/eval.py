"""`python run.py eval`: the demo world's test split through the session engine.

1. Every session of DATA/<split>/ is replayed through the engine (`app.replay.replay`, virtual
   clock) once per generation mode; engine turns are matched to the ground-truth questions.
   Scores: answer accuracy per question type, per group and overall (normalised reply text
   vs the expected answer, numbers as words); vanilla vs MCTP (accuracy, audio-token
   agreement, backbone forwards per second of reply audio, wall per audio second); response
   and compute latency (median, p90) on the named hardware.
2. Spoken answers: each reply's audio vs the reference answer in the agent's voice
   (DATA/answers/): codec-code agreement with the reference's codes, a DTW-aligned log-mel
   distance, and whether an independent recogniser (Whisper tiny.en) hears the expected
   answer in it (exact words, and by the slot rule) and its word error rate against the
   reply's own text; DNSMOS of the reply audio (`lab.spoken_eval`); per question type. The
   references themselves are the ceiling.
3. Ablations: text-only answers (a fast path, no engine) of the main model and of models
   trained with the same budget without the aggregator ("mean") or with one modality.
4. A natural-voice split (`natural_data`: a data directory whose test split's questions are
   spoken by a voice unlike training's) scored as the test split is, beside it per type.
5. OUT/eval.json, OUT/eval.md (the tables, also printed) and OUT/accuracy.png.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from speech.constants import SAMPLE_RATE, TURN_END_THRESHOLD
from .ablations import ABLATION_NAMES, ABLATION_STEPS, check_main_run, check_train_split, run_ablations
from .answers import accuracy_table, answers_match, normalize_answer, question_events, session_dirs  # noqa: F401

MODES = ("vanilla", "mctp")              # fusion.generator.MODES
GROUPS = ("visual", "audio", "audio-visual")


@dataclass(frozen=True)
class EvalOptions:
    data: str = "data/demo"
    split: str = "test"
    model: str | None = "assets/fusion.safetensors"
    codec: str | None = None             # default: the codec the checkpoint names (or codec/ beside it)
    random: bool = False                 # an untrained demo-preset agent instead of `model`
    modes: tuple[str, ...] = MODES
    max_sessions: int | None = None
    recognizer: bool = True              # spoken answers through Whisper tiny.en
    dnsmos: bool = True                  # DNSMOS (speechmos) of the spoken answers
    natural_data: str | None = None      # also DIR/test (questions in a natural voice), per type
    out: str = "runs/eval"
    device: str | None = None
    threads: int | None = None
    max_text_tokens: int = 24
    max_audio_seconds: float = 4.0
    turn_end: str = "model"              # model (shipped predictor, else silence) | silence | PATH
    turn_end_threshold: float = TURN_END_THRESHOLD
    max_end_of_turn_silence: float = 1.2
    preemptive_pause: float | None = 0.1  # None: the held reply starts at the predictor's pause
    ablations: bool = False              # also the ablation table (trains missing ablations)
    ablation_names: tuple[str, ...] = ABLATION_NAMES
    ablation_steps: int = ABLATION_STEPS  # align steps for each ablation and the full-model control
    train_run: str = "runs/fusion"       # the main run: options, encoders, feature cache
    ablation_data: str | None = None     # instead of train_run: MODEL's encoders on this data's train split
    ablation_root: str = "runs"          # ablation runs: ROOT/ablation-<name>/
    ablation_workers: int | None = None  # ablations trained at once (None: 2 on a 2+ core CPU, else 1)
    progress: bool = True

    def __post_init__(self):
        errors = []
        if self.split not in ("val", "test"):
            errors.append(f"split must be 'val' or 'test' (session directories), got {self.split!r}")
        if not self.modes or len(set(self.modes)) != len(self.modes) or set(self.modes) - set(MODES):
            errors.append(f"modes must be distinct values from {MODES}, got {self.modes!r}")
        if self.max_sessions is not None and (not isinstance(self.max_sessions, int) or self.max_sessions < 1):
            errors.append(f"max_sessions must be None or an int >= 1, got {self.max_sessions!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            errors.append(f"threads must be None or an int >= 1, got {self.threads!r}")
        if self.max_text_tokens < 1 or not self.max_audio_seconds > 0:
            errors.append("max_text_tokens must be >= 1 and max_audio_seconds > 0")
        if not 0 < self.turn_end_threshold <= 1:
            errors.append(f"turn_end_threshold must be within (0, 1], got {self.turn_end_threshold}")
        if not 0.2 < self.max_end_of_turn_silence <= 5:
            errors.append(f"max_end_of_turn_silence must be within (0.2, 5] s, got {self.max_end_of_turn_silence}")
        if not self.random and not self.model:
            errors.append("give a model path (--model) or random=True (--random)")
        if not isinstance(self.ablation_steps, int) or self.ablation_steps < 1:
            errors.append(f"ablation_steps must be an int >= 1, got {self.ablation_steps!r}")
        if self.ablation_workers is not None and (not isinstance(self.ablation_workers, int)
                                                  or self.ablation_workers < 1):
            errors.append(f"ablation_workers must be None or an int >= 1, got {self.ablation_workers!r}")
        if self.natural_data is not None and (not isinstance(self.natural_data, str) or not self.natural_data):
            errors.append(f"natural_data must be None or a data directory, got {self.natural_data!r}")
        if set(self.ablation_names) - set(ABLATION_NAMES):
            errors.append(f"ablation_names must come from {ABLATION_NAMES}, got {self.ablation_names!r}")
        if errors:
            raise ValueError("EvalOptions: " + "; ".join(errors))
        for name in ("modes", "ablation_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass
class EvalReport:
    out_dir: Path
    results: dict                        # what eval.json holds
    markdown: str                        # what eval.md holds

    def accuracy(self, mode: str) -> float | None:
        return self.results["modes"][mode]["accuracy"]["overall"]


# --- scoring (pure) ---------------------------------------------------------------------------
def heldout_triple_turns(session_json: dict) -> list[bool] | None:
    """Per turn of a demo-world session: does its scene show a colour-shape-slot triple that
    the training split never shows (`world.HELDOUT_TRIPLES`)? None for other sessions."""
    from demo.world import HELDOUT_TRIPLES
    spec = session_json.get("spec") if session_json.get("world") == "demo" else None
    if not isinstance(spec, dict):
        return None
    return [any((o["color"], o["shape"], o["slot"]) in HELDOUT_TRIPLES for o in t["scene"]["objects"])
            for t in spec["turns"]]


def code_agreement(a, b) -> float | None:
    """Fraction of codec codes equal between two (n_q, F) code arrays over the shorter F;
    0.0 when exactly one is empty, None when both are."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.ndim == b.ndim == 2 and a.shape[0] == b.shape[0], (a.shape, b.shape)
    m = min(a.shape[1], b.shape[1])
    if m == 0:
        return None if a.shape[1] == b.shape[1] == 0 else 0.0
    return float((a[:, :m] == b[:, :m]).mean())


def log_mel(x16k: np.ndarray) -> np.ndarray:
    """(frames, 80) log mel (1024-point STFT, hop 256) as `lab.train_codec.mel_distance`."""
    import torch
    import torchaudio
    from .train_codec import LOG_MEL_FLOOR
    t = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=1024, hop_length=256, n_mels=80,
                                             power=1.0, normalized=True)
    return torch.log(t(torch.from_numpy(np.ascontiguousarray(x16k, np.float32))) + LOG_MEL_FLOOR).T.numpy()


def dtw_mel_distance(ref16k: np.ndarray, est16k: np.ndarray) -> float:
    """Mean |log mel difference| along the DTW alignment of the two utterances (per mel bin
    and aligned frame pair), so a reply spoken faster or slower is not penalised."""
    a, b = log_mel(ref16k), log_mel(est16k)
    cost = np.abs(a[:, None, :] - b[None, :, :]).mean(-1)                   # (Na, Nb)
    n, m = cost.shape
    D = np.full((n + 1, m + 1), np.inf)
    L = np.zeros((n + 1, m + 1))
    D[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            k = int(np.argmin((D[i - 1, j - 1], D[i - 1, j], D[i, j - 1])))
            pi, pj = ((i - 1, j - 1), (i - 1, j), (i, j - 1))[k]
            D[i, j] = cost[i - 1, j - 1] + D[pi, pj]
            L[i, j] = L[pi, pj] + 1
    return float(D[n, m] / L[n, m])


def match_turns(turns: list, questions: list[dict]) -> list:
    """For each ground-truth question, the engine turn that answers it: of the turns whose
    speech overlaps the question, the one ending last (its reply is the one heard); None."""
    out = []
    for q in questions:
        hits = [r for r in turns if min(r.speech_end, q["t_end"]) - max(r.speech_start, q["t"]) > 0]
        out.append(max(hits, key=lambda r: r.speech_end) if hits else None)
    return out


def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"median": None, "p90": None, "mean": None, "n": 0}
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "mean": float(v.mean()),
            "n": int(len(v))}


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


# --- the engine path ------------------------------------------------------------------------
class _CodeTap:
    """Wraps the agent's codec: the generator's streaming decoder records every reply's codes
    (a reset starts a reply), so the exact generated codes can be compared."""

    def __init__(self, codec):
        self._codec, self.replies = codec, []

    def __getattr__(self, name):
        return getattr(self._codec, name)

    def streaming_decoder(self, batch: int = 1):
        return _TapDecoder(self._codec.streaming_decoder(batch), self.replies)


class _TapDecoder:
    def __init__(self, inner, replies: list):
        self.inner, self.replies = inner, replies

    def reset(self):
        self.replies.append([])
        self.inner.reset()

    def decode(self, codes):
        self.replies[-1].append(codes[0].cpu().numpy())
        return self.inner.decode(codes)


def _replay_all(agent, sessions: list[Path], mode: str, o: EvalOptions, out: Path,
                turn_end_model: str | None = None) -> tuple[list, list, float]:
    """Replays every session in one mode -> per-question records, all turns, wall seconds."""
    from tqdm import tqdm
    from app.agent import Agent
    from app.engine import EngineOptions, with_generation
    from app.replay import replay
    from app.session import load_session
    opts = with_generation(EngineOptions(threaded=False, turn_end_model=turn_end_model,
                                         turn_end_threshold=o.turn_end_threshold,
                                         max_end_of_turn_silence=o.max_end_of_turn_silence,
                                         preemptive_pause=o.preemptive_pause),
                           mode=mode, max_text_tokens=o.max_text_tokens,
                           max_audio_seconds=o.max_audio_seconds)
    records, turns, wall = [], [], 0.0
    for sdir in tqdm(sessions, desc=f"replay ({mode})", unit="session", disable=not o.progress):
        tap = _CodeTap(agent.codec)
        rdir = out / "replays" / mode / sdir.name
        rep = replay(sdir, rdir, Agent(agent.model, tap, agent.name), options=opts, progress=False)
        wall += rep.wall_seconds
        codes = tap.replies if len(tap.replies) == len(rep.turns) else [None] * len(rep.turns)
        by_turn = {r.turn: None if c is None else _stack(c, agent.codec.n_q) for r, c in zip(rep.turns, codes)}
        turns += rep.turns
        session = load_session(sdir)
        qs, held = question_events(session), heldout_triple_turns(session.meta)
        for q, r in zip(qs, match_turns(rep.turns, qs)):
            turn = q.get("turn")
            pause = q.get("pause")
            rec = {"session": sdir.name, "turn": turn, "qtype": q.get("qtype"),
                   "pause": pause, "cut_off": cut_off(rep.turns, q) if pause else None,
                   "group": q.get("group"), "question": q.get("text"), "expected": q.get("answer"),
                   # the reply text in the data's version (v2 sentence; v1 data: the answer)
                   "reference": q.get("reply") or q.get("answer"),
                   "heldout_triple": held[turn] if held and isinstance(turn, int) and turn < len(held) else None,
                   "engine_turn": None, "text": "", "correct": False, "audio": None, "codes": None}
            if r is not None:
                rec.update(engine_turn=r.turn, text=r.text,
                           correct=answers_match(r.text, q.get("answer", ""), q.get("qtype")),
                           response_latency=r.response_latency, end_of_turn_wait=r.end_of_turn_wait,
                           compute_latency=r.compute_latency, turn_end=r.turn_end,
                           discarded_starts=r.discarded_starts,
                           reply_seconds=r.reply_seconds, backbone_forwards=r.backbone_forwards,
                           audio=str(rdir / r.audio_file) if r.audio_file else None,
                           codes=by_turn[r.turn])
            records.append(rec)
    return records, turns, wall


def cut_off(turns: list, q: dict, tolerance: float = 0.15) -> bool:
    """Did the agent take the turn inside the question's hesitation (`pause` [t0, t1])? Some
    committed turn started before the pause and its speech ended at the pause (within
    `tolerance` of its start, for the VAD's window grid), so it answered the question's head."""
    t0, t1 = q["pause"]
    return any(r.speech_start < t0 and t0 - tolerance <= r.speech_end <= t1 for r in turns)


def turn_taking_summary(records: list, turns: list) -> dict:
    """Cut-off rate on hesitant questions, accuracy with and without hesitations, what ended
    the turns and the share of preemptive starts that were discarded."""
    hes = [r for r in records if r.get("pause")]
    fluent = [r for r in records if not r.get("pause")]
    acc = lambda rs: (sum(bool(r["correct"]) for r in rs) / len(rs)) if rs else None  # noqa: E731
    reasons = {k: sum(getattr(t, "turn_end", None) == k for t in turns)
               for k in ("predictor", "max_silence", "silence")}
    discarded = sum(getattr(t, "discarded_starts", 0) or 0 for t in turns)
    starts = reasons["predictor"] + reasons["max_silence"] + discarded
    return {"hesitant_questions": len(hes), "fluent_questions": len(fluent),
            "cut_off": sum(bool(r["cut_off"]) for r in hes),
            "cut_off_rate": (sum(bool(r["cut_off"]) for r in hes) / len(hes)) if hes else None,
            "accuracy_hesitant": acc(hes), "accuracy_fluent": acc(fluent),
            "turn_end": reasons, "preemptive_starts": starts, "discarded_starts": discarded,
            "discarded_share": discarded / starts if starts else None,
            "response_latency_questions": _stats(r.get("response_latency") for r in records),
            "response_latency_hesitant": _stats(r.get("response_latency") for r in hes)}


def _stack(chunks: list, n_q: int) -> np.ndarray:
    return np.concatenate(chunks, 1) if chunks else np.zeros((n_q, 0), np.int64)


def _mode_summary(records: list, turns: list, wall: float) -> dict:
    audio_s = sum(t.reply_seconds for t in turns)
    gen_wall = sum(t.reply_seconds / t.generation_rtf for t in turns if t.generation_rtf)
    forwards = sum(t.backbone_forwards for t in turns)
    return {"accuracy": accuracy_table(records), "questions": len(records),
            "missed": sum(r["engine_turn"] is None for r in records),
            "engine_turns": len(turns), "replay_wall_seconds": wall,
            "response_latency": _stats(t.response_latency for t in turns),
            "end_of_turn_wait": _stats(t.end_of_turn_wait for t in turns),
            "compute_latency": _stats(t.compute_latency for t in turns),
            "turn_taking": turn_taking_summary(records, turns),
            "reply_seconds": audio_s, "backbone_forwards": forwards,
            "backbone_forwards_per_audio_second": forwards / audio_s if audio_s else None,
            "generation_wall_per_audio_second": gen_wall / audio_s if audio_s else None}


def _compare_modes(recs: dict) -> dict:
    v, m = recs["vanilla"], recs["mctp"]
    agree = [code_agreement(a["codes"], b["codes"]) for a, b in zip(v, m)
             if a["codes"] is not None and b["codes"] is not None]
    same_text = [normalize_answer(a["text"]) == normalize_answer(b["text"]) for a, b in zip(v, m)
                 if a["engine_turn"] is not None and b["engine_turn"] is not None]
    return {"audio_token_agreement": _mean(agree), "turns_compared": len([x for x in agree if x is not None]),
            "text_agreement": _mean(same_text)}


# --- spoken answers -------------------------------------------------------------------------
def load_recognizer():
    from speech.recognizer import IndependentRecognizer
    try:
        return IndependentRecognizer(cpu_threads=1)
    except (ImportError, FileNotFoundError) as e:
        raise type(e)(f"{e} (or evaluate without it: --no-recognizer)") from e


def recognise(recognizer, audio16k: np.ndarray, expected: str) -> tuple[str, bool]:
    """(transcript, whether it is the expected answer) for one utterance at 16 kHz."""
    from speech.recognizer import is_recognized
    if len(audio16k) == 0:
        return "", False
    text = recognizer.transcribe(audio16k)
    return text, is_recognized(expected, text)


class References:
    """The agent's spoken answers (DATA/answers/): 16 kHz audio, codec codes, transcripts."""

    def __init__(self, data, codec, recognizer=None, dnsmos=None):
        self.dir = Path(data) / "answers"
        index = self.dir / "answers.json"
        if not index.is_file():
            raise FileNotFoundError(f"{index} is missing: regenerate the data with `python run.py data`")
        self.files = json.loads(index.read_text())
        self.codec, self.recognizer, self.dnsmos, self._cache = codec, recognizer, dnsmos, {}

    def get(self, answer: str) -> dict | None:
        if answer not in self._cache:
            self._cache[answer] = self._load(answer) if answer in self.files else None
        return self._cache[answer]

    def _load(self, answer: str) -> dict:
        import torch
        from speech.audio import load_audio
        path = self.dir / self.files[answer]
        x = load_audio(path, self.codec.sample_rate)
        with torch.inference_mode():
            codes = self.codec.encode(torch.from_numpy(x)[None, None].to(self.codec.device))[0]
        ref = {"audio16k": load_audio(path, SAMPLE_RATE), "codes": codes.cpu().numpy()}
        if self.recognizer is not None:
            ref["transcript"], ref["recognised"] = recognise(self.recognizer, ref["audio16k"], answer)
        if self.dnsmos is not None:
            ref["dnsmos"] = self.dnsmos.score(ref["audio16k"], SAMPLE_RATE)
        return ref


def score_spoken(records: list, refs: References) -> dict:
    """Adds spoken-answer scores to each record; returns their means, and the recogniser's
    (slot rule, word error rate) and DNSMOS scores overall and per type (`spoken_summary`)."""
    from speech.audio import load_audio
    from speech.recognizer import is_recognized
    from .spoken_eval import judge_reply, spoken_summary
    for r in records:
        ref = refs.get(r["reference"])
        if ref is None:
            continue
        audio = load_audio(r["audio"], SAMPLE_RATE) if r["audio"] else np.zeros(0, np.float32)
        if r["codes"] is not None:
            r["codes_vs_reference"] = code_agreement(r["codes"], ref["codes"])
        r["mel_dtw"] = dtw_mel_distance(ref["audio16k"], audio) if len(audio) >= 1024 else None
        if refs.recognizer is not None:
            # recognised: heard word for word as the expected reply (its version's sentence)
            r["transcript"], r["recognised"] = recognise(refs.recognizer, audio, r["reference"])
            # the voice's intelligibility apart from the answer's correctness
            r["heard_as_reply"] = bool(r["text"].strip()) and is_recognized(r["text"], r["transcript"])
        judge_reply(r, r.get("transcript"), audio, refs.dnsmos)   # audio: 16 kHz, resampled by load_audio
    scored = [r for r in records if refs.get(r["reference"]) is not None]
    return {"n": len(scored), "codes_vs_reference": _mean(r.get("codes_vs_reference") for r in scored),
            "mel_dtw": _mean(r.get("mel_dtw") for r in scored),
            "recognised": _mean(float(r["recognised"]) for r in scored if "recognised" in r),
            "heard_as_reply": _mean(float(r["heard_as_reply"]) for r in scored if "heard_as_reply" in r),
            **spoken_summary(scored)}


# --- main -----------------------------------------------------------------------------------
def load_eval_agent(o: EvalOptions):
    from app.agent import Agent, random_agent
    from fusion.checkpoint import load_model, load_with_codec, pick_device
    from speech.codec import load_codec
    if o.random:
        return random_agent("demo", device=o.device)
    if o.codec:
        dev = pick_device(o.device)
        codec = load_codec(o.codec, device=dev)
        model = load_model(o.model, device=str(dev), codec=codec)
    else:
        model, codec = load_with_codec(o.model, device=o.device)
    return Agent(model, codec, Path(o.model).stem)


def evaluate(options: EvalOptions) -> EvalReport:
    """Runs the evaluation described in the module doc; writes OUT/eval.json, eval.md, accuracy.png."""
    import torch
    from .bench import hardware
    from .model_card import eval_markdown, plot_accuracy
    o = options
    threads = torch.get_num_threads()
    if o.threads:
        torch.set_num_threads(o.threads)
    try:
        sessions = session_dirs(o.data, o.split, o.max_sessions)
        natural = natural_sessions(o) if o.natural_data else None
        if o.ablations and o.ablation_data:   # fail before the long part, not after it
            check_train_split(o.ablation_data)
        elif o.ablations:
            check_main_run(Path(o.train_run))
        agent = load_eval_agent(o)
        out = Path(o.out)
        out.mkdir(parents=True, exist_ok=True)
        recognizer = load_recognizer() if o.recognizer else None
        from .spoken_eval import DNSMOS_KEYS, heard_right, load_dnsmos, pooled_rate, word_errors
        refs = References(o.data, agent.codec, recognizer, load_dnsmos() if o.dnsmos else None)
        timings, recs, modes = {}, {}, {}
        from app.engine import turn_end_choice
        turn_end_model = turn_end_choice(o.turn_end, print if o.progress else None)
        for mode in o.modes:
            t0 = time.perf_counter()
            recs[mode], turns, wall = _replay_all(agent, sessions, mode, o, out, turn_end_model)
            modes[mode] = _mode_summary(recs[mode], turns, wall)
            timings[f"replay_{mode}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            modes[mode]["spoken"] = score_spoken(recs[mode], refs)
            timings[f"spoken_{mode}"] = time.perf_counter() - t0
        if natural:
            t0 = time.perf_counter()
            natural = score_natural(agent, natural, o, out / "natural", turn_end_model)
            timings["natural"] = time.perf_counter() - t0
        qs = recs[o.modes[0]]
        ceiling = [refs.get(r["reference"]) for r in qs]
        heard = [(r, c["transcript"]) for r, c in zip(qs, ceiling) if c and "transcript" in c]
        results = {
            "format": "tandem-eval", "version": 1, "options": asdict(o), "model": agent.name,
            "hardware": hardware(next(agent.model.parameters()).device),
            "data": _manifest_counts(o.data), "split": o.split, "sessions": len(sessions),
            "questions": len(qs), "modes": modes, "turn_end_model": turn_end_model,
            "mctp_vs_vanilla": None, "spoken_reference": {
                "n": sum(c is not None for c in ceiling),
                "recognised": _mean(float(c["recognised"]) for c in ceiling if c and "recognised" in c),
                "heard_slots": _mean(heard_right(t, r["expected"], r["qtype"]) for r, t in heard),
                "wer": pooled_rate(word_errors(r["reference"], t) for r, t in heard),
                "dnsmos": {k: _mean((c.get("dnsmos") or {}).get(k) for c in ceiling if c) for k in DNSMOS_KEYS}},
            "natural": natural,
            "ablations": None, "timings_s": timings, "turns": _turn_rows(recs)}
        if set(MODES) <= set(o.modes):
            results["mctp_vs_vanilla"] = _compare_modes(recs)
            v, m = modes["vanilla"], modes["mctp"]
            for key, name in (("backbone_forwards_per_audio_second", "forwards_speedup"),
                              ("generation_wall_per_audio_second", "wall_speedup")):
                results["mctp_vs_vanilla"][name] = v[key] / m[key] if v[key] and m[key] else None
        if o.ablations:
            t0 = time.perf_counter()
            results["ablations"] = run_ablations(o)
            timings["ablations"] = time.perf_counter() - t0
        md = eval_markdown(results)
        (out / "eval.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
        (out / "eval.md").write_text(md + "\n")
        plot_accuracy(results, out / "accuracy.png")
        if o.progress:
            print(md)
        return EvalReport(out, results, md)
    finally:
        torch.set_num_threads(threads)


def score_natural(agent, sessions: list[Path], o: EvalOptions, out: Path, turn_end_model) -> dict:
    """The natural-voice split replayed and scored as the test split is (answer accuracy per
    type, per mode; replays in OUT/replays/): its questions differ in voice, its replies not."""
    res = {"data": o.natural_data, "split": "test", "sessions": len(sessions), "modes": {}}
    for mode in o.modes:
        recs, _, _ = _replay_all(agent, sessions, mode, o, out, turn_end_model)
        res["modes"][mode] = {"accuracy": accuracy_table(recs), "questions": len(recs),
                              "missed": sum(r["engine_turn"] is None for r in recs)}
    return res


def natural_sessions(o: EvalOptions) -> list[Path]:
    """The natural-voice split's sessions (NATURAL_DATA/test), checked before the long part."""
    try:
        return session_dirs(o.natural_data, "test", o.max_sessions)
    except FileNotFoundError:
        raise FileNotFoundError(f"--natural-data {o.natural_data}: no test sessions there; render them with "
                                f"`python run.py data --out {o.natural_data} --question-voice piper`") from None


def _turn_rows(recs: dict) -> list[dict]:
    """One row per question: ground truth plus, per mode, what the agent said and its scores."""
    keep = ("session", "turn", "qtype", "group", "question", "expected", "heldout_triple")
    skip = {*keep, "codes", "audio"}
    rows = []
    for i, base in enumerate(next(iter(recs.values()))):
        row = {k: base.get(k) for k in keep}
        row["modes"] = {m: {k: v for k, v in rs[i].items() if k not in skip} for m, rs in recs.items()}
        rows.append(row)
    return rows


def _manifest_counts(data) -> dict | None:
    p = Path(data) / "manifest.json"
    if not p.is_file():
        return None
    m = json.loads(p.read_text())
    return {"counts": m.get("counts"), "seed": m.get("seed"), "content_sha256": m.get("content_sha256")}


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")
