"""Why did the model answer that? Re-render a recorded demo-world session with objects recoloured,
keep its audio, and ask the same question again (text path, one turn).

    python -m lab.probes.recolour_probe data/demo-large/test/00006 --turn 7 \\
        --recolour 2:220,40,40 --recolour 2:40,200,60 --recolour 0:230,210,40

Each --recolour OBJECT:R,G,B is one variant: that object of the turn's scene (in every turn that
shows it) drawn in that colour. If "Is there a yellow circle?" turns to "yes." only when the triangle is
drawn yellow, the model heard "triangle": the question, not the picture, was misread.
"""
import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch

from app.session import load_session
from demo import world as W
from fusion.checkpoint import load_model
from lab.data import write_session
from lab.ablations import encode_session_turns, evaluate_text_only


def _recolour(s: str) -> tuple[int, tuple[int, int, int]]:
    try:
        obj, rgb = s.split(":")
        v = tuple(int(x) for x in rgb.split(","))
        if len(v) != 3 or not all(0 <= x <= 255 for x in v):
            raise ValueError(v)
        return int(obj), v
    except ValueError:
        raise argparse.ArgumentTypeError(f"--recolour wants OBJECT:R,G,B (each 0..255), e.g. 2:220,40,40; "
                                         f"got {s!r}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("session", help="a session rendered by `run.py data` (its session.json holds the spec)")
    p.add_argument("--turn", type=int, required=True, help="the turn whose question is asked again")
    p.add_argument("--recolour", type=_recolour, action="append", default=[], metavar="OBJECT:R,G,B",
                   help="one variant: the object at this index of the turn's scene drawn in this colour")
    p.add_argument("--model", default="assets/fusion.safetensors")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    src = Path(args.session)
    meta = json.loads((src / "session.json").read_text())
    if "spec" not in meta:
        p.error(f"{src} has no demo-world spec: only sessions from `run.py data` can be re-rendered")
    turns = meta["spec"]["turns"]
    if not 0 <= args.turn < len(turns):
        p.error(f"--turn {args.turn}: the session has turns 0..{len(turns) - 1}")
    objs = turns[args.turn]["scene"]["objects"]
    for o, _ in args.recolour:
        if not 0 <= o < len(objs):
            p.error(f"--recolour {o}:...: turn {args.turn}'s scene has objects 0..{len(objs) - 1}: "
                    + ", ".join(f"{x['color']} {x['shape']} ({x['slot']})" for x in objs))
    model = load_model(args.model, device="cpu").float().eval()
    audio = load_session(src).audio
    q = turns[args.turn]["question"]
    print(f"{q['text']!r} expected {q['answer']!r}; scene: "
          + ", ".join(f"[{i}] {x['color']} {x['shape']} ({x['slot']}) rgb {tuple(x['rgb'])}" for i, x in enumerate(objs)))
    with tempfile.TemporaryDirectory() as tmp:
        for n, (o, rgb) in enumerate([(None, None)] + args.recolour):
            spec = copy.deepcopy(meta["spec"])
            if o is not None:
                for t in spec["turns"]:
                    for x in t["scene"]["objects"]:
                        if x == objs[o]:
                            x["rgb"] = list(rgb)
            out = Path(tmp) / f"v{n}"
            write_session(out, W.SessionSpec.from_dict(spec), audio,
                          {k: meta[k] for k in ("world", "split", "seed", "session_index") if k in meta})
            ex = encode_session_turns(model, out)[args.turn]
            reply = evaluate_text_only(model, examples=[ex])["replies"][0]["text"]   # the eval's text path
            what = "as recorded" if o is None else f"[{o}] drawn rgb {rgb}"
            print(f"  {what:32s} -> {reply.strip()!r}", flush=True)
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
