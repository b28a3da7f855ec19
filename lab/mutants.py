"""Hand-picked mutants of the core, and whether the test suite kills them.

    python -m lab.mutants                 # every mutant: killed / SURVIVED / error
    python -m lab.mutants --list          # what they are
    python -m lab.mutants --only NAME ... # some of them
    python -m lab.mutants --baseline      # first check the named tests pass unmutated

Each mutant is (file, original snippet, mutated snippet, tests to run): a bug the named tests
claim to catch. The tree (git's tracked and untracked-not-ignored files; assets/ linked, not
copied) is copied once to a temporary directory; each mutant is applied there alone, its tests
run with `pytest -x`, and the file restored. A mutant is killed when a test fails (pytest exit
status 1); any other non-zero status (collection error, timeout) is reported as an error.
Survivors are listed in docs/MUTANTS.md. Stdlib only, so it runs from any checkout.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_TEST_TIMEOUT = 300   # s per test


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str            # path relative to the repository root
    original: str        # must occur exactly once in the file
    mutated: str
    tests: tuple[str, ...]
    why: str = ""


ENGINE_TESTS = ("tests/test_engine.py",)
TF = "tests/test_train_fusion.py::"
RESUME = (TF + "test_training_resumes_mid_stage",)
STAGED = TF + "test_staged_pipeline_trains_and_resumes"
DDP = TF + "test_ddp_two_cpu_processes_end_with_identical_weights"
FACTORISED = TF + "test_factorised_slot_heads_learn_colour_and_shape_apart"
SHIPPED = "tests/test_shipped.py::"

MUTANTS: tuple[Mutant, ...] = (
    # --- the session engine (app/engine.py) --------------------------------------------------
    Mutant("engine-ignores-cancel", "app/engine.py",
           "            for ev in self.generator.run(prefix, t0=wall0):\n                if cancel.is_set():\n                    break\n",
           "            for ev in self.generator.run(prefix, t0=wall0):\n",
           ENGINE_TESTS, "the reply loop runs its generator on after a barge-in"),
    Mutant("engine-cancel-never-set", "app/engine.py",
           "                r.cancel.set()\n                if r.held:",
           "                if r.held:", ENGINE_TESTS,
           "cancel() joins the reply without telling it to stop"),
    Mutant("engine-no-barge-in", "app/engine.py",
           "if self.opts.barge_in and self.replying(frame.t):",
           "if False and self.opts.barge_in and self.replying(frame.t):", ENGINE_TESTS,
           "user speech during a reply does not interrupt it"),
    Mutant("engine-half-duplex-off", "app/engine.py",
           "if self.half_duplex and self.speaking(frame.t):",
           "if False and self.half_duplex and self.speaking(frame.t):", ENGINE_TESTS,
           "the mic is not muted while the agent speaks"),
    Mutant("engine-short-turns-count", "app/engine.py",
           "if frame.t - self.start < self.opts.min_turn_seconds:",
           "if frame.t - self.start < 0:", ENGINE_TESTS, "a cough or click becomes a turn"),
    Mutant("engine-short-end-of-turn", "app/engine.py",
           "min_silence_ms=int(round(opts.shortest_turn_silence * 1000))",
           "min_silence_ms=int(round(opts.shortest_turn_silence * 100))", ENGINE_TESTS,
           "a turn ends after a tenth of the configured silence"),
    # --- the generator (fusion/generator.py) -------------------------------------------------
    Mutant("generator-ignores-min-audio", "fusion/generator.py",
           "            if len(frames) < min_frames:\n                logits[0] = float(\"-inf\")\n", "",
           ENGINE_TESTS, "EOA allowed before min_audio_seconds (benchmarks and tests rely on it)"),
    Mutant("generator-drops-last-chunk", "fusion/generator.py",
           "        if self.decoder is not None and pending:",
           "        if False and self.decoder is not None and pending:",
           ("tests/test_fusion.py",), "the frames after the last full chunk are never spoken"),
    Mutant("generator-ignores-max-text", "fusion/generator.py",
           "if len(text_ids) + 1 >= o.max_text_tokens and tok != lay.eot:",
           "if False and len(text_ids) + 1 >= o.max_text_tokens and tok != lay.eot:",
           ("tests/test_fusion.py",), "the text phase runs past max_text_tokens"),
    Mutant("generator-mctp-token-misplaced", "fusion/generator.py",
           "                    E[b + 1 + k] = m.embed.weight[tok]",
           "                    E[b + k] = m.embed.weight[tok]", ("tests/test_fusion.py",),
           "an MCTP token's embedding written one position early (cached != full forward)"),
    Mutant("generator-codebooks-reversed", "fusion/generator.py",
           "        codes = torch.stack(frames, 1)[None].to(self.device)",
           "        codes = torch.stack(frames, 1).flip(0)[None].to(self.device)",
           (SHIPPED + "test_shipped_model_says_its_answers_aloud",),
           "the codec decodes the codebooks in reverse order: right text, garbled speech"),
    Mutant("generator-text-from-stale-state", "fusion/generator.py",
           "            tok = self._sample(m.text_logits(H[0, pos - 1]), rng)",
           "            tok = self._sample(m.text_logits(H[0, max(pos - 2, 0)]), rng)",
           (SHIPPED + "test_shipped_model_replies_in_sentences",
            SHIPPED + "test_shipped_model_answers_the_example_sessions_right"),
           "each text token predicted from the state one step old (the shipped model's answers)"),
    # --- live playback (app/live.py) ----------------------------------------------------------
    Mutant("live-interrupt-keeps-queue", "app/live.py",
           "        elif isinstance(f, Interrupt):\n            self.sink.clear()\n",
           "        elif isinstance(f, Interrupt):\n", ("tests/test_live.py::test_barge_in_clears_the_speaker",),
           "a barge-in leaves the rest of the reply queued in the speaker"),
    # --- the websocket protocol (app/protocol.py) --------------------------------------------
    Mutant("protocol-accepts-split-samples", "app/protocol.py",
           "        if len(body) % 2:", "        if False:", ("tests/test_protocol.py",),
           "odd-length PCM16 accepted"),
    Mutant("protocol-ignores-direction", "app/protocol.py",
           "    if kind not in allowed:", "    if False:", ("tests/test_protocol.py",),
           "a client may send server kinds"),
    Mutant("protocol-no-size-limit", "app/protocol.py",
           "if limit is not None and len(body) > limit:",
           "if limit is not None and len(body) > 2 * limit:", ("tests/test_protocol.py",),
           "payloads over the per-kind limit accepted"),
    Mutant("protocol-accepts-bool-version", "app/protocol.py",
           "if type(version) is not int or version != PROTOCOL_VERSION:",
           "if version != PROTOCOL_VERSION:", ("tests/test_protocol.py",),
           "a handshake with protocol: true passes as version 1"),
    # --- the training loop (lab/train_loop.py) -----------------------------------------------
    Mutant("loop-no-resume", "lab/train_loop.py",
           "if resume and state_path.exists():", "if False and resume and state_path.exists():",
           RESUME, "a killed stage restarts from scratch"),
    Mutant("loop-resume-forgets-weights", "lab/train_loop.py",
           "        module.load_state_dict(st[\"model\"])\n", "", RESUME,
           "resume keeps the step count but not the weights"),
    Mutant("loop-resume-forgets-optimizer", "lab/train_loop.py",
           "        optim.load_state_dict(st[\"optim\"])\n", "", RESUME,
           "resume restarts AdamW's moments"),
    Mutant("loop-no-step", "lab/train_loop.py", "        optim.step()\n", "", (STAGED,),
           "the loop computes losses but never updates the weights"),
    Mutant("loop-no-step-ddp", "lab/train_loop.py", "        optim.step()\n", "", (DDP,),
           "DDP ranks agree only because nothing moved"),
    Mutant("loop-no-ddp", "lab/train_loop.py",
           "    model = module\n    if dist.is_initialized():",
           "    model = module\n    if False:", (DDP,),
           "DDP ranks train apart (no gradient all-reduce)"),
    # --- the training stages (lab/train_fusion.py, lab/pretrain.py) ---------------------------
    Mutant("sampler-by-type-ignored", "lab/train_fusion.py",
           'by_type = type_groups([e.qtype for e in examples]) if o.sample == "by_type" else None',
           "by_type = None", (TF + "test_align_trains_on_type_balanced_batches",),
           "--sample by_type draws uniform batches"),
    Mutant("sampler-by-type-uniform", "lab/train_fusion.py",
           "    if by_type is not None:", "    if False:",
           (TF + "test_type_balanced_batches_weigh_every_type_the_same",),
           "type-balanced batches are drawn uniformly over turns"),
    Mutant("pretrain-slot-right-if-either", "lab/pretrain.py",
           "            right &= logits.argmax(-1) == target",
           "            right |= logits.argmax(-1) == target", (FACTORISED,),
           "a slot counts as right when its colour or its shape is"),
    Mutant("pretrain-shape-head-learns-colour", "lab/pretrain.py",
           'else [colour, shape])', 'else [colour, colour])', (FACTORISED,),
           "the factorised shape head is trained on colours"),
    # --- evaluation (lab/eval.py) -------------------------------------------------------------
    Mutant("eval-spoken-score-of-one-turn", "lab/eval.py",
           '"codes_vs_reference": _mean(r.get("codes_vs_reference") for r in scored)',
           '"codes_vs_reference": _mean(r.get("codes_vs_reference") for r in scored[:1])',
           ("tests/test_eval.py::test_spoken_scores_compare_transcripts_with_the_replies_sentence",),
           "the spoken-answer summary is not the mean over the answers"),
    Mutant("eval-dnsmos-of-the-reference", "lab/eval.py",
           'judge_reply(r, r.get("transcript"), audio, refs.dnsmos)',
           'judge_reply(r, r.get("transcript"), ref["audio16k"], refs.dnsmos)',
           ("tests/test_spoken_eval.py::test_eval_reports_spoken_scores_per_type_and_the_natural_split",),
           "DNSMOS scores the reference answer, not the reply"),
    Mutant("eval-wer-reversed", "lab/spoken_eval.py",
           'e = word_errors(rec["text"], transcript)', 'e = word_errors(transcript, rec["text"])',
           ("tests/test_spoken_eval.py::test_reply_judged_by_slot_rule_and_wer_per_type",),
           "the word error rate is counted against the transcript, not the reply text"),
    Mutant("eval-dnsmos-not-resampled", "lab/spoken_eval.py",
           "x = np.clip(resample_whole(x, sample_rate, DNSMOS_RATE), -1.0, 1.0)",
           "x = np.clip(x, -1.0, 1.0)",
           ("tests/test_spoken_eval.py::test_dnsmos_resamples_other_rates",),
           "audio at another rate (the codec's) is scored as if it were 16 kHz"),
    Mutant("rebind-skips-the-codes-check", "fusion/checkpoint.py",
           "    if not same_codes(old, new_codec):", "    if False:",
           ("tests/test_codec_gan.py::test_rebind_moves_a_model_to_the_new_codec_and_refuses_other_codes",),
           "a model is bound to a codec whose codes mean something else"),
    Mutant("gan-moves-the-codebooks", "lab/codec_gan.py",
           "                codes = model.quantizer.vq.encode(model.encoder(x), n_q=codec.n_q)  # (n_q, B, F)\n"
           "                q = model.quantizer.decode(codes)                            # (B, D, F)",
           "                from lab.train_codec import quantize_train\n"
           "                model.quantizer.train()\n"
           "                q = quantize_train(model.quantizer, model.encoder(x), 0.25)[0]",
           ("tests/test_codec_gan.py::test_finetuning_changes_the_decoder_and_keeps_every_code",),
           "decoder fine-tuning updates the codebooks (EMA), so the codes change"),
    Mutant("swapped-replies-train-their-text", "fusion/model.py",
           "            targets = targets.masked_fill(off, IGNORE)", "            pass",
           ("tests/test_fusion.py::test_text_on_trains_some_replies_on_their_audio_alone",),
           "a swapped reply teaches the model to say another answer than the scene's"),
)



def _copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if rel.startswith("assets/") or not src.is_file():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)
    (dst / "assets").symlink_to(ROOT / "assets")           # large and read-only: linked


def _pytest(tree: Path, tests, timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           f"--timeout={PER_TEST_TIMEOUT}",                 # a hung test fails (pytest-timeout)
           f"--basetemp={tree / '.pytest-tmp'}", *tests]    # apart from other pytest runs
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    return p.returncode, lines[-1] if lines else ""


def check(mutants, timeout: float = 900, baseline: bool = False, out=print) -> dict[str, str]:
    """Applies each mutant to a temporary copy of the tree; returns {name: killed|SURVIVED|error}."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="tandem-mutants-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        if baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            rc, last = _pytest(tree, tests, timeout)
            out(f"baseline (unmutated): {'ok' if rc == 0 else 'FAILS'}  {last}")
            if rc != 0:
                raise SystemExit("the named tests fail on the unmutated tree; fix that first")
        for m in mutants:
            path = tree / m.file
            text = path.read_text()
            if text.count(m.original) != 1:
                results[m.name] = "error"
                out(f"{m.name:38s} error: the original snippet occurs {text.count(m.original)} "
                    f"times in {m.file} (the code moved: update lab/mutants.py)")
                continue
            t0 = time.perf_counter()
            path.write_text(text.replace(m.original, m.mutated))
            try:
                rc, last = _pytest(tree, m.tests, timeout)
            finally:
                path.write_text(text)
            verdict = "killed" if rc == 1 else "SURVIVED" if rc == 0 else "error"
            results[m.name] = verdict
            out(f"{m.name:38s} {verdict:8s} {time.perf_counter() - t0:5.0f} s  {last}")
    n = sum(v == "killed" for v in results.values())
    out(f"\n{n}/{len(results)} killed; survived: "
        f"{', '.join(k for k, v in results.items() if v == 'SURVIVED') or 'none'}; "
        f"errors: {', '.join(k for k, v in results.items() if v == 'error') or 'none'}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.mutants", description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--baseline", action="store_true", help="check the unmutated tree first")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    a = ap.parse_args(argv)
    chosen = list(MUTANTS)
    if a.only:
        names = {m.name for m in MUTANTS}
        unknown = set(a.only) - names
        if unknown:
            ap.error(f"unknown mutant(s) {sorted(unknown)}; see --list")
        chosen = [m for m in MUTANTS if m.name in a.only]
    if a.list:
        for m in chosen:
            print(f"{m.name:38s} {m.file:24s} {m.why}\n{'':38s} tests: {' '.join(m.tests)}")
        return 0
    results = check(chosen, a.timeout, a.baseline)
    return 0 if all(v == "killed" for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
