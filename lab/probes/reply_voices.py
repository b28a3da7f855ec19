"""How well can a recogniser hear each agent voice say the replies? No model involved.

Speaks every distinct reply of the demo world (version 1 phrases or version 2 sentences) in
each voice, transcribes it with the eval's independent recogniser (Whisper tiny.en), and
counts replies heard right by the slot rule (demo/replies.py), exact words, and the word
error rate against the reply text. This is the ceiling a model speaking in that voice can
reach before its own errors; `--codec DIR` also scores each reply after a round trip through
that codec (what a perfect model's codes would sound like).

    python -m lab.probes.reply_voices piper:en_US-joe-medium en-us+m3:165:50 flite:rms --version 2
"""
from __future__ import annotations

import argparse
import json

from demo import world as W
from demo.replies import sentence, slot_match
from speech.recognizer import IndependentRecognizer, is_recognized, word_errors
from speech.tts import parse_voice, synthesize


def replies(version: int) -> list[tuple[str, str]]:
    """(question type, reply text) for every distinct reply of the world."""
    out = set()
    for c in W.COLORS:
        for s in W.SHAPES:
            out.add(("what_color", f"What color is the {s}?", f"{c}."))
            out.add(("which_object", "Which object made the sound?", f"the {c} {s}."))
        out.add(("color_of_sound", "What color is the object that beeped?", f"{c}."))
    for s in W.SHAPES:
        out.add(("shape_at", "What shape is on the left?", f"a {s}."))
    for p in W.SLOTS:
        out.add(("where_is", "Where is the red circle?", f"on the {p}."))
        out.add(("where_sound", "Where did the sound come from?", f"the {p}."))
    for n in W.NUMBER_WORDS:
        if n != "none":
            out.add(("count_objects", "How many objects are there?", f"{n}."))
        out.add(("count_beeps", "How many beeps did you hear?", f"{n}."))
    for yn in ("yes.", "no."):
        out.add(("is_there", "Is there a red circle?", yn))
        out.add(("did_make_sound", "Did the red circle make a sound?", yn))
    for h in ("high.", "low."):
        out.add(("pitch", "Was the sound high or low?", h))
    return sorted((t, a if version == 1 else sentence(t, q, a)) for t, q, a in out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("voices", nargs="+", help="voice specs (speech.tts.parse_voice)")
    ap.add_argument("--version", type=int, choices=(1, 2), default=2,
                    help="reply wording: 1 phrases, 2 sentences (default %(default)s)")
    ap.add_argument("--codec", help="also score the replies after encoding + decoding with "
                                    "this codec directory")
    ap.add_argument("--json", help="write the per-reply transcripts here")
    args = ap.parse_args(argv)
    rec = IndependentRecognizer()
    through = [("", None)]
    if args.codec:
        from lab.train_codec import reconstruct
        from speech.codec import load_codec
        codec = load_codec(args.codec)
        through.append((f" via {args.codec}", lambda x: reconstruct(codec, x)[0]))
    table, dump = [], {}
    for spec, (suffix, codec_fn) in ((s, t) for s in args.voices for t in through):
        voice = parse_voice(spec)
        rows = []
        spec = spec + suffix
        for qtype, text in replies(args.version):
            x = synthesize(text, voice)
            heard = rec.transcribe(codec_fn(x) if codec_fn else x)
            errs, n = word_errors(text, heard)
            rows.append((qtype, text, heard, slot_match(heard, text, qtype),
                         is_recognized(text, heard), errs, n))
        n = len(rows)
        table.append((spec, sum(r[3] for r in rows), sum(r[4] for r in rows),
                      sum(r[5] for r in rows) / sum(r[6] for r in rows), n))
        dump[spec] = [dict(zip(("qtype", "text", "heard", "slots", "exact", "errors", "words"), r))
                      for r in rows]
        misses = [f"{r[1]!r} -> {r[2]!r}" for r in rows if not r[3]]
        print(f"{spec}: misses {misses}")
    print(f"\nversion {args.version} replies | slot rule | exact words | WER")
    for spec, slots_ok, exact, wer, n in table:
        print(f"{spec} | {slots_ok}/{n} | {exact}/{n} | {100 * wer:.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)


if __name__ == "__main__":
    main()
