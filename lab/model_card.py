"""Readable tables of an evaluation (eval.md, the printed summary, accuracy.png) and the model
card (assets/MODEL_CARD.md): data, training recipe and time, evaluation, ablations, limits."""
from __future__ import annotations

import json
from pathlib import Path

from app.frames import latency_legend
from speech.tts import voice_from_dict, voice_spec

GROUPS = ("visual", "audio", "audio-visual")
ABLATION_LABELS = {"main": "main (text only)", "full": "full model, same budget",
                   "mean": "no aggregator (mean)",
                   "vision": "vision only", "audio": "audio only"}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def accuracy_columns(results: dict) -> dict[str, dict]:
    """Column label -> accuracy table (`lab.answers.accuracy_table`), engine modes first."""
    cols = {f"{m} (engine)": s["accuracy"] for m, s in results["modes"].items()}
    for name, r in ((results.get("ablations") or {}).get("models") or {}).items():
        cols[ABLATION_LABELS.get(name, name)] = r
    return cols


def _qtype_order(cols: dict) -> list[str]:
    try:
        from demo.world import QTYPE_IDS
    except ImportError:  # pragma: no cover - the world module is always there in a checkout
        QTYPE_IDS = ()
    seen = {q for c in cols.values() for q in c["by_type"]}
    return [q for q in QTYPE_IDS if q in seen] + sorted(seen - set(QTYPE_IDS))


def accuracy_markdown(results: dict) -> str:
    cols = accuracy_columns(results)
    first = next(iter(cols.values()))
    rows = []
    for q in _qtype_order(cols):
        rows.append([q, str(first["by_type"].get(q, {}).get("n", 0))] +
                    [_pct(c["by_type"].get(q, {}).get("accuracy")) for c in cols.values()])
    for g in GROUPS:
        if any(g in c["by_group"] for c in cols.values()):
            rows.append([f"**{g}**", str(first["by_group"].get(g, {}).get("n", 0))] +
                        [_pct(c["by_group"].get(g, {}).get("accuracy")) for c in cols.values()])
    rows.append(["**overall**", str(first["n"])] + [_pct(c["overall"]) for c in cols.values()])
    return _table(["question type", "n", *cols], rows)


def natural_markdown(results: dict) -> str:
    """Accuracy per question type on the test split and, beside it, on the natural-voice split."""
    nat = results["natural"]["modes"]
    cols = {}
    for m, s in results["modes"].items():
        cols[f"{m}: test"] = s["accuracy"]
        if m in nat:
            cols[f"{m}: natural voices"] = nat[m]["accuracy"]
    test, natural = results["modes"], next(iter(nat.values()))["accuracy"]
    first = next(iter(test.values()))["accuracy"]
    n = lambda c, q: str(c["by_type"].get(q, {}).get("n", 0))  # noqa: E731
    rows = [[q, n(first, q), n(natural, q)] + [_pct(c["by_type"].get(q, {}).get("accuracy")) for c in cols.values()]
            for q in _qtype_order(cols)]
    rows.append(["**overall**", str(first["n"]), str(natural["n"])] + [_pct(c["overall"]) for c in cols.values()])
    return _table(["question type", "n test", "n natural", *cols], rows)


def _dnsmos(d) -> str:
    """"OVRL (SIG / BAK)" of a DNSMOS mean."""
    if not d or d.get("ovrl") is None:
        return "-"
    return f"{d['ovrl']:.2f} ({_num(d.get('sig'), '.2f')} / {_num(d.get('bak'), '.2f')})"


def spoken_by_type_markdown(modes: dict) -> str | None:
    """Per question type and mode: heard right by the slot rule, word error rate against the
    reply text, DNSMOS overall; None for evals made before these scores."""
    scored = lambda c: any(v is not None for v in (c.get("heard_slots"), c.get("wer"),  # noqa: E731
                                                   (c.get("dnsmos") or {}).get("ovrl")))
    have = {m: s["spoken"] for m, s in modes.items()
            if s["spoken"].get("by_type") and scored(s["spoken"]["overall"])}
    if not have:
        return None
    types = _qtype_order({m: sp for m, sp in have.items()})
    first = next(iter(have.values()))
    cell = lambda c: [_pct(c.get("heard_slots")), _pct(c.get("wer")),  # noqa: E731
                      _num((c.get("dnsmos") or {}).get("ovrl"), ".2f")]
    rows = [[q, str(first["by_type"].get(q, {}).get("n", 0))]
            + [x for sp in have.values() for x in cell(sp["by_type"].get(q, {}))] for q in types]
    rows.append(["**overall**", str(first["overall"]["n"])] + [x for sp in have.values() for x in cell(sp["overall"])])
    return _table(["question type", "n"] + [f"{m} {k}" for m in have for k in ("heard right", "WER", "DNSMOS")],
                  rows)


def eval_markdown(results: dict) -> str:
    """eval.md: accuracy, MCTP vs vanilla, spoken answers, latency, hardware."""
    r, modes = results, results["modes"]
    o = r["options"]
    out = [f"# Evaluation: {r['model']} on {o['data']}/{r['split']}", "",
           f"{r['sessions']} sessions, {r['questions']} questions; hardware: {r['hardware']}.", "",
           "## Answer accuracy", "",
           "Reply text vs the expected answer (lower case, no punctuation, numbers as words). "
           "Engine columns: the session engine on the recorded sessions (VAD turns, streaming "
           "encoders); ablation columns: the text-only fast path on ground-truth question spans.", "",
           accuracy_markdown(r), ""]
    scenes = {m: s["accuracy"].get("by_scene") for m, s in modes.items() if s["accuracy"].get("by_scene")}
    if scenes:
        out += ["Scenes with a colour-shape-slot triple the training split never shows, vs the rest: "
                + "; ".join(f"{m} {_pct(b['held-out triple']['accuracy'])} (n={b['held-out triple']['n']}) "
                            f"vs {_pct(b['seen triples only']['accuracy'])} (n={b['seen triples only']['n']})"
                            for m, b in scenes.items()) + ".", ""]
    missed = {m: s["missed"] for m, s in modes.items() if s["missed"]}
    if missed:
        out += [f"Questions the engine never took a turn for (counted wrong): {missed}.", ""]
    if r.get("natural"):
        nat = r["natural"]
        out += ["## Natural voices", "",
                f"Answer accuracy, scored as above, on the test split of {nat['data']} ({nat['sessions']} "
                f"sessions), whose questions are spoken in a natural voice that no training question uses "
                f"(`python run.py data --question-voice piper`: Piper en_US-joe-medium), beside the test "
                f"split.", "",
                natural_markdown(r), ""]
    if r.get("ablations"):
        ab = r["ablations"]
        st = ab.get("steps") or {}
        start = (f"from this model's encoders (their features of {ab['ablation_data']}'s training split)"
                 if ab.get("ablation_data") else "from the main run's encoders and feature cache")
        if ab.get("encoders_only"):
            start += ", everything else a fresh seed init"
        out += [f"Ablations: each trained with the same budget, the align stage (text answers; "
                f"{st.get('align_steps')} steps, batch {st.get('batch')}) {start}, "
                f"scored on the same questions; *full model, same budget* is the "
                f"unchanged architecture trained alike (the control), *main (text only)* the "
                f"shipped model with its whole training.", ""]
    rows = [[m, _num(s["backbone_forwards_per_audio_second"], ".1f"),
             _num(s["generation_wall_per_audio_second"]), _pct(s["accuracy"]["overall"])]
            for m, s in modes.items()]
    out += ["## Vanilla vs MCTP", "", _table(["mode", "backbone forwards / s of reply audio",
                                               "generation wall s / s of audio", "accuracy"], rows), ""]
    c = r.get("mctp_vs_vanilla")
    if c:
        out += [f"MCTP speedup: {_num(c['forwards_speedup'], '.2f')}x fewer backbone forwards per second "
                f"of audio, {_num(c['wall_speedup'], '.2f')}x wall clock. Audio-token agreement "
                f"(codes equal to vanilla's, same turn, over the shorter reply): "
                f"{_pct(c['audio_token_agreement'])} over {c['turns_compared']} turns; same reply text: "
                f"{_pct(c['text_agreement'])}.", ""]
    rows = [[m, str(s["spoken"]["n"]), _pct(s["spoken"]["codes_vs_reference"]),
             _num(s["spoken"]["mel_dtw"]), _pct(s["spoken"]["recognised"]),
             _pct(s["spoken"].get("heard_as_reply")), _pct(s["spoken"].get("overall", {}).get("heard_slots")),
             _pct(s["spoken"].get("overall", {}).get("wer")), _dnsmos(s["spoken"].get("overall", {}).get("dnsmos"))]
            for m, s in modes.items()]
    ref = r["spoken_reference"]
    rows.append(["reference (agent voice)", str(ref["n"]), "100.0%", "0.000", _pct(ref["recognised"]),
                 _pct(ref["recognised"]), _pct(ref.get("heard_slots")), _pct(ref.get("wer")),
                 _dnsmos(ref.get("dnsmos"))])
    out += ["## Spoken answers", "",
            "Reply audio vs the reference answer in the agent's voice: codec codes equal to the "
            "reference's (over the shorter), log-mel distance after DTW alignment, and whether "
            "Whisper tiny.en (independent of Tandem) hears the expected answer (recognised: the "
            "expected reply word for word; heard right: its slot values, the slot rule) or the reply's own text, right or "
            "wrong (heard as the reply, and the word error rate of the transcript against the reply "
            "text, pooled over replies: the voice's intelligibility); DNSMOS P.835 overall quality "
            "(speech / background), 1-5. The reference row is the ceiling (its WER: against the "
            "expected answer).", "",
            _table(["replies", "n", "codes = reference", "mel distance (DTW)", "recognised",
                    "heard as the reply", "heard right (slot rule)", "word error rate",
                    "DNSMOS OVRL (SIG / BAK)"], rows), ""]
    by_type = spoken_by_type_markdown(modes)
    if by_type:
        out += ["Per question type (heard right: slot rule; WER: against the reply text; DNSMOS: "
                "overall):", "", by_type, ""]
    wait = lambda s, k: _num(s["end_of_turn_wait"][k]) if s.get("end_of_turn_wait") else "-"  # noqa: E731 (older evals)
    rows = [[m, _num(s["response_latency"]["median"]), _num(s["response_latency"]["p90"]), wait(s, "median"),
             _num(s["compute_latency"]["median"]), _num(s["compute_latency"]["p90"])] for m, s in modes.items()]
    out += ["## Latency (s)", "",
            f"Replay on a virtual clock (no sound played: the first reply sound is the first reply "
            f"audio ready): {latency_legend()}. Hardware: {r['hardware']}.", "",
            _table(["mode", "response median", "response p90", "end-of-turn wait median", "compute median",
                    "compute p90"], rows)]
    tt = {m: s["turn_taking"] for m, s in modes.items() if s.get("turn_taking")}
    if tt:                                  # older evals lack it
        rule = r.get("turn_end_model") or "a fixed silence (END_OF_TURN_SILENCE)"
        rows = [[m, f"{t['cut_off']}/{t['hesitant_questions']} ({_pct(t['cut_off_rate'])})",
                 _pct(t["accuracy_hesitant"]), _pct(t["accuracy_fluent"]),
                 ", ".join(f"{k} {v}" for k, v in t["turn_end"].items() if v) or "-",
                 f"{t['discarded_starts']}/{t['preemptive_starts']} ({_pct(t['discarded_share'])})"]
                for m, t in tt.items()]
        out += ["", "## Turn taking", "",
                f"What ends the user's turn: {rule}. Cut off: a hesitant question (one with a "
                f"`pause` in its events) whose pause the agent took as the end of the turn; "
                f"discarded: preemptive replies started at a pause and dropped because the user "
                f"went on.", "",
                _table(["mode", "cut off (hesitant questions)", "accuracy with hesitation",
                        "accuracy without", "turns ended by", "discarded preemptive starts"], rows)]
    return "\n".join(out)


def plot_accuracy(results: dict, path) -> None:
    """Grouped bars: accuracy per question type (and overall), one bar per model/mode."""
    import numpy as np
    from matplotlib.figure import Figure
    cols = accuracy_columns(results)
    types = _qtype_order(cols) + ["overall"]
    fig = Figure(figsize=(max(8.0, 0.9 * len(types) + 4), 4.5), dpi=100)
    ax = fig.subplots()
    w = 0.8 / max(len(cols), 1)
    x = np.arange(len(types))
    for i, (label, c) in enumerate(cols.items()):
        vals = [c["overall"] if t == "overall" else c["by_type"].get(t, {}).get("accuracy") for t in types]
        ax.bar(x + (i - (len(cols) - 1) / 2) * w, [0 if v is None else v for v in vals], w, label=label)
    ax.set_xticks(x, types, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("answer accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the bars, not on them
    ax.set_title(f"{results['model']}: {results['questions']} questions ({results['split']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))


# --- the model card ---------------------------------------------------------------------------
def _read(path) -> dict | None:
    p = Path(path) if path else None
    return json.loads(p.read_text()) if p and p.is_file() else None


def write_model_card(eval_json, train_run_dir, codec_report_json, out="assets/MODEL_CARD.md") -> Path:
    """Writes the model card from eval.json, the training run (options.json, timings.json,
    pipeline.json if any) and the codec's report.json."""
    ev = eval_json if isinstance(eval_json, dict) else _read(eval_json)
    if ev is None:
        raise FileNotFoundError(f"no evaluation at {eval_json}: run `python run.py eval` first")
    run = Path(train_run_dir)
    opts, timings = _read(run / "options.json") or {}, _read(run / "timings.json") or {}
    pipeline, codec = _read(run / "pipeline.json"), _read(codec_report_json)
    manifest = _read(Path(ev["options"]["data"]) / "manifest.json") or {}
    L = [f"# Model card: Tandem {ev['model']}", "",
         "A real-time audio-visual conversational agent trained on the demo world "
         "(`docs/DEMO_WORLD.md`): it watches a scene, hears beeps and a spoken question, and "
         "answers in a short spoken phrase, text and speech generated together.", "", "## Data", ""]
    counts = manifest.get("counts") or {}
    if counts:
        L += [_table(["split", "sessions", "turns", "hours"],
                     [[s, str(c["sessions"]), str(c["turns"]), f"{c['seconds'] / 3600:.2f}"]
                      for s, c in counts.items()]), ""]
        held = manifest.get("heldout", {})
        espeak = str(manifest.get("espeak_ng", "?")).split("Data at")[0].strip()
        voice = manifest.get("agent_voice")
        voice = f" `{voice_spec(voice_from_dict(voice))}`" if voice else ""
        L += [f"Rendered with seed {manifest.get('seed')} ({espeak}); "
              f"{manifest.get('answers', '?')} distinct answers spoken by the fixed agent voice{voice}; codec "
              f"corpus {manifest.get('codec', {}).get('train', '?')} sentences. The test split uses "
              f"held-out voices ({', '.join(held.get('voices', []))}; variants "
              f"{', '.join(held.get('variants', []))}) and forces held-out colour/shape/slot triples "
              f"({', '.join(' '.join(t) for t in held.get('triples', []))}) into half its scenes.", ""]
    L += ["## Training", ""]
    model_path = ev["options"].get("model")
    if model_path and Path(model_path).is_file():
        from fusion.checkpoint import read_header
        from fusion.model import FusionModel
        cfg, _ = read_header(model_path)
        L += [f"Model: {FusionModel(cfg).num_params() / 1e6:.1f} M parameters; backbone {cfg.n_layer} x "
              f"{cfg.d_model} ({cfg.backbone}), {cfg.n_clues} clues from the {cfg.aggregator} aggregator over "
              f"{' + '.join(cfg.modalities)}, {cfg.mctp_k} MCTP modules, codec `{cfg.codec.name}` "
              f"({cfg.codec.n_q} x {cfg.codec.bins} codes at {cfg.codec.frame_rate:g} frames/s), text "
              f"tokenizer {cfg.tokenizer}.", ""]
    if opts:
        L += [f"Preset `{opts.get('preset')}`, staged as VITA-Audio stages it: encoders pretrained on "
              f"auxiliary labels ({opts.get('encoder_steps')} steps), then with encoders frozen and "
              f"their features cached: align (text answers, {opts.get('align_steps')} steps), SFT "
              f"(text + codec tokens, {opts.get('sft_steps')} steps), MCTP modules "
              f"({opts.get('mctp_steps')} steps); batch {opts.get('batch')}"
              + (f" per process x {opts['world_size']} processes (DDP)" if opts.get("world_size", 1) > 1 else "")
              + f", lr {opts.get('lr')}, "
              f"seed {opts.get('seed')}, device {opts.get('device') or 'auto'}.", ""]
    if timings:
        L += [_table(["stage", "minutes"], [[k, f"{v / 60:.1f}"] for k, v in timings.items()] +
                     [["**total**", f"{sum(timings.values()) / 60:.1f}"]]), ""]
    if pipeline:
        L += ["Whole pipeline (`python run.py train all`, budget "
              f"`{pipeline.get('budget')}`): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in
                                                          pipeline.get("steps_s", {}).items()) + ".", ""]
    if codec:
        h = codec.get("heldout", {})
        asr = h.get("recognizer", {}).get("answers", {})
        L += [f"Codec `{codec.get('codec', {}).get('name')}`: {codec.get('codec', {}).get('n_q')} codebooks "
              f"x {codec.get('codec', {}).get('bins')} codes at {codec.get('codec', {}).get('frame_rate')} "
              f"frames/s, {codec.get('steps')} steps in {(codec.get('train_seconds_total') or 0) / 60:.1f} min "
              f"on {codec.get('device')}; held-out SI-SNR {h.get('si_snr_db')} dB, mel distance "
              f"{h.get('mel_distance')}" + (f"; answers recognised by Whisper tiny.en: original "
                                            f"{_pct(asr['original']['utterance_accuracy'])}, reconstructed "
                                            f"{_pct(asr['reconstructed']['utterance_accuracy'])}"
                                            if "original" in asr else "") + ".", ""]
    if (run / "NOTES.md").is_file():               # how this particular run was made, by hand
        L += [(run / "NOTES.md").read_text().strip(), ""]
    body = eval_markdown(ev).split("\n", 1)[1].replace("\n## ", "\n### ")
    L += ["## Evaluation", "", body.strip(), ""]
    if pipeline and pipeline.get("paths", {}).get("sessions_out"):
        model = pipeline["paths"].get("model_out", "assets/fusion.safetensors")
        flag = "" if model == "assets/fusion.safetensors" else f" --model {model}"
        L += [f"Try it: `python run.py replay {pipeline['paths']['sessions_out']}/demo-1{flag}` replays a short "
              f"rendered test session (held-out voice) through the engine with this model.", ""]
    L += ["## Limits", "",
          "- It knows only the demo world: three shapes, four colours, three slots, beeps; any "
          "other scene or question gets a confident answer from that vocabulary.",
          "- English only; questions must follow the demo world's templates (the question "
          "audio is encoded, not transcribed: paraphrases are untested).",
          "- Test voices are held out from training, but all speech is synthetic"
          + (" (the natural-voice split: one neural voice)" if ev.get("natural") else "")
          + ": real human voices, accents and rooms are untested.",
          "- One fixed synthetic agent voice; replies longer than a short phrase are out of scope.",
          "- Questions only about the 6 s before they end; no memory across turns.",
          "- Latencies above were measured on the named hardware under replay (virtual clock); "
          "live capture adds device buffering."]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n")
    return out
