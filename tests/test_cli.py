"""The command line: every subcommand has a description and every flag a help text; `train all`
writes into a run directory unless --ship."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import run


def _subparsers(p: argparse.ArgumentParser):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            yield from a.choices.items()


def walk(p: argparse.ArgumentParser, path: str = "run.py"):
    """(path, parser) for `p` and every subcommand below it (lazy parsers populated)."""
    p.format_help()                       # train's lazy subparsers add their flags here
    yield path, p
    for name, sub in _subparsers(p):
        yield from walk(sub, f"{path} {name}")


def problems_of(p: argparse.ArgumentParser) -> list[str]:
    out = []
    for path, parser in walk(p):
        if path != "run.py" and not (parser.description or "").strip():
            out.append(f"`{path}` has no description")
        for a in parser._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (a.help or "").strip() or a.help == argparse.SUPPRESS:
                out.append(f"`{path}` {'/'.join(a.option_strings) or a.dest} has no help text")
    return out


def test_every_subcommand_and_flag_is_described():
    parser = run.build_parser()
    paths = [path for path, _ in walk(parser)]
    # the walk reaches the nested subcommands, and their lazily added flags
    assert {"run.py bench", "run.py data", "run.py train fusion", "run.py train all",
            "run.py record", "run.py eval"} <= set(paths), paths
    fusion = dict(walk(parser))["run.py train fusion"]
    assert any("--lr" in a.option_strings for a in fusion._actions)
    assert problems_of(parser) == []


def test_the_walk_catches_a_missing_help():
    p = argparse.ArgumentParser(prog="x")
    sub = p.add_subparsers()
    s = sub.add_parser("thing", help="does a thing")         # help but no description
    s.add_argument("--flag")
    assert problems_of(p) == ["`run.py thing` has no description",
                              "`run.py thing` --flag has no help text"]


def test_quiet_launch_no_library_warnings():
    """Starting a command prints only what the user needs: building a codec raises no torch
    FutureWarning (encodec's weight_norm), and OpenCV's own camera warnings are off (CameraError
    says it with what to do)."""
    import warnings

    import cv2

    import vision.camera  # noqa: F401  (sets OpenCV's log level)
    from speech.codec import build_codec
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_codec("tiny")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], \
        [str(w.message) for w in caught]
    assert cv2.utils.logging.getLogLevel() <= cv2.utils.logging.LOG_LEVEL_ERROR


def test_train_all_writes_a_run_directory_and_ships_only_when_asked(tmp_path):
    from lab import pipeline
    names = list(pipeline.RUN_LAYOUT)
    for argv in (["train", "all"], ["train", "all", "--budget", "large"],
                 ["train", "all", "--budget", "small"]):
        o = pipeline._options_from_args(run.build_parser().parse_args(argv))
        assert not o.ship
        for name in names:                 # nothing the run writes lands in the shipped assets
            assert Path("assets") not in o.path(name).parents, (argv, name, o.path(name))
    o = pipeline._options_from_args(run.build_parser().parse_args(["train", "all"]))
    assert o.path("model_out") == Path("runs/all/fusion.safetensors")
    assert o.path("codec_dir") == Path("runs/all/codec") and o.path("data") == Path("data/demo")
    assert pipeline._options_from_args(run.build_parser().parse_args(["train", "all", "--ship"])).ship
    with pytest.raises(ValueError, match="smoke run"):
        pipeline.PipelineOptions(budget="small", ship=True)

    # --ship copies a finished run into assets/, replacing what was there
    o = pipeline.PipelineOptions(codec_dir=str(tmp_path / "r/codec"), model_out=str(tmp_path / "r/m.st"),
                                 card_out=str(tmp_path / "r/CARD.md"), sessions_out=str(tmp_path / "r/s"),
                                 eval_out=str(tmp_path / "r/eval"), ship=True)
    assets = tmp_path / "assets"
    (assets / "codec").mkdir(parents=True)
    (assets / "codec" / "old.json").write_text("old")
    with pytest.raises(FileNotFoundError, match="not finished"):
        pipeline.ship_assets(o, assets)
    for d in ("r/codec", "r/s/demo-1", "r/eval"):
        (tmp_path / d).mkdir(parents=True)
    for f, text in (("r/codec/codec.json", "c"), ("r/m.st", "m"), ("r/CARD.md", "card"),
                    ("r/s/demo-1/session.json", "s"), ("r/eval/accuracy.png", "png")):
        (tmp_path / f).write_text(text)
    shipped = pipeline.ship_assets(o, assets)
    assert sorted(p.name for p in shipped) == ["MODEL_CARD.md", "accuracy.png", "codec",
                                               "fusion.safetensors", "sessions"]
    assert (assets / "fusion.safetensors").read_text() == "m"
    assert (assets / "codec" / "codec.json").read_text() == "c"
    assert not (assets / "codec" / "old.json").exists()
    assert (assets / "sessions" / "demo-1" / "session.json").read_text() == "s"
