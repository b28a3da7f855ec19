"""Reply versions in the data (`run.py data --replies v1|v2`): the answers, the codec corpus
and the training examples speak the version the data was rendered for."""
import json

import numpy as np
import pytest
import torch

from demo import replies as R
from demo import world as W


def test_reply_texts_cover_every_question_the_world_asks():
    assert R.all_reply_texts("v1") == W.all_answer_texts()
    v2 = set(R.all_reply_texts("v2"))
    assert "The square is green." in v2 and "There is one object." in v2
    assert "There are none objects." not in v2           # counts of objects start at one
    rng = np.random.default_rng(0)
    for i in range(150):
        scene = W.sample_scene(rng, 0.5)
        for qtype in W.QTYPE_IDS:
            for q in W.candidate_questions(scene, qtype):
                r = R.reply_text(q.qtype, q.text, q.answer, "v2")
                assert r in v2 and R.slot_match(r, q.answer, q.qtype), (q, r)
                assert R.reply_text(q.qtype, q.text, q.answer, "v1") == q.answer
    with pytest.raises(ValueError, match="v1, v2"):
        R.reply_text("pitch", "Was the sound high or low?", "high.", "2")


def test_v2_asks_what_shape_is_in_the_middle():
    """Version 2 words one question differently; nothing else in the session changes."""
    from tests.test_data_voices import fake_synth
    seen = 0
    for i in range(40):
        a, b = (W.sample_session(np.random.default_rng([0, 0, i]), 4,
                                 W.SplitRules("train", version=v), synth=fake_synth)
                for v in ("v1", "v2"))
        for s, t in zip(a.turns, b.turns):
            assert s.scene.objects == t.scene.objects and s.question.answer == t.question.answer
            if s.question.text == "What shape is on the middle?":
                assert t.question.text == "What shape is in the middle?"
                assert R.reply_text("shape_at", t.question.text, t.question.answer, "v2") == \
                    R.sentence("shape_at", s.question.text, s.question.answer)
                seen += 1
            else:
                assert s.question.text == t.question.text
    assert seen >= 2
    with pytest.raises(ValueError, match="one of v1, v2"):
        W.SplitRules("train", version="2")


def test_codec_sentences_v2_start_with_the_sentences_and_hold_none_out():
    from lab.data import codec_sentences
    v2 = R.all_reply_texts("v2")
    train, evals = codec_sentences(0, 200, 2500, "v2")               # nearly the whole pool
    assert train[:len(v2)] == list(v2) and len(train) == 200 and len(set(train)) == 200
    said = {tuple(R.words(t)) for t in v2}
    assert not any(tuple(R.words(t)) in said for t in evals)          # not even in lower case
    assert not set(train) & set(evals) and len(evals) == 2500
    assert codec_sentences(0, 200, 40) == codec_sentences(0, 200, 40, "v1")   # v1 as before
    assert codec_sentences(0, 200, 40, "v1")[0][:33] == list(W.all_answer_texts())


@pytest.fixture(scope="module")
def v2_data(tmp_path_factory):
    from lab.data import main
    d = tmp_path_factory.mktemp("replies") / "data"
    m = main(d, n_train_sessions=1, n_val_sessions=1, n_test_sessions=0, turns_per_session=2,
             seed=5, workers=1, progress=False, n_codec_sentences=3, n_codec_eval=1,
             question_voice="espeak")
    return d, m


def test_v2_data_trains_on_sentence_replies(v2_data):
    """The answers, the codec corpus, the sessions' events and the training examples the
    trainer builds all carry the version-2 sentences, read from the data itself."""
    from app.session import load_session
    from fusion.config import preset
    from fusion.model import FusionModel
    from lab.data import TrainShards
    from lab.trainset import encode_turns
    from speech.codec import build_codec
    d, m = v2_data
    assert m["replies"] == "v2" and m["options"]["replies"] == "v2"
    answers = json.loads((d / "answers" / "answers.json").read_text())
    assert set(answers) == set(R.all_reply_texts("v2"))
    corpus = json.loads((d / "codec" / "sentences.json").read_text())
    assert corpus["replies"] == "v2"
    assert [e["text"] for e in corpus["train"]] == list(R.all_reply_texts("v2")[:3])
    from lab.train_codec import load_split, reply_waves
    waves, texts = load_split(d / "codec", "train")
    assert len(reply_waves(d / "codec", waves, texts)) == 3     # the codec trainer finds them
    shards = TrainShards(d)
    assert shards.replies == "v2"
    torch.manual_seed(0)
    model = FusionModel(preset("tiny", build_codec("tiny").spec)).eval()
    examples = encode_turns(model, shards, list(range(len(shards))), progress=False)
    for i, e in enumerate(examples):
        spec, j = shards.turn(i)
        q = spec.turns[j].question
        assert e.answer == R.sentence(q.qtype, q.text, q.answer) != q.answer, (e.answer, q)
        assert e.answer in answers                      # the trainer finds its audio
    (event, *_) = [e for e in load_session(d / "val" / "00000").events if e["type"] == "question"]
    assert event["reply"] == R.sentence(event["qtype"], event["text"], event["answer"])


def test_data_without_a_reply_version_reads_as_v1(v2_data, tmp_path):
    """Data from before reply versions (no "replies" in manifest.json or index.json) trains on
    the version-1 phrases."""
    import shutil
    from lab.data import TrainShards
    from lab.train_codec import corpus_replies
    d = tmp_path / "old"
    shutil.copytree(v2_data[0], d)
    for f in (d / "manifest.json", d / "train" / "index.json", d / "codec" / "sentences.json"):
        meta = json.loads(f.read_text())
        meta.pop("replies")
        f.write_text(json.dumps(meta))
    shards = TrainShards(d / "train")
    assert shards.replies == "v1" and corpus_replies(d / "codec") == "v1"
    spec, j = shards.turn(0)
    assert shards.reply(0) == spec.turns[j].question.answer
    meta = json.loads((d / "manifest.json").read_text())      # the manifest alone says v2
    meta["replies"] = "v2"
    (d / "manifest.json").write_text(json.dumps(meta))
    assert TrainShards(d).replies == "v2"


def test_reply_version_is_validated_and_reaches_the_cli(tmp_path):
    import run
    from lab.data import DataOptions
    assert DataOptions().replies == "v2" and DataOptions(replies="v1").replies == "v1"
    with pytest.raises(ValueError, match="one of v1, v2"):
        DataOptions(replies="2")
    from lab.data import split_rules
    for v in ("v1", "v2"):                             # the sessions' questions follow it
        assert {split_rules(DataOptions(replies=v), s).version for s in ("train", "val", "test")} == {v}
    assert run.DATA_REPLIES == R.REPLY_VERSIONS
    args = run.build_parser().parse_args(["data", "--replies", "v1", "--out", str(tmp_path)])
    assert args.replies == "v1"
    assert run.build_parser().parse_args(["data"]).replies == "v2"
