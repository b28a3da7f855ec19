"""Fusion model: config, losses, cached generation == full forward, MCTP, checkpoints."""
import dataclasses
import math

import pytest
import torch

from fusion.checkpoint import CheckpointError, load_model, read_header, save_model
from fusion.config import FusionConfig, preset
from fusion.dummy import random_features
from fusion.generator import (AudioFrame, GenerationDone, GenerationOptions, Generator, PCMChunk,
                              TextToken)
from fusion.model import IGNORE, FusionModel
from speech.codec import build_codec


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return build_codec("tiny")


@pytest.fixture(scope="module")
def model(codec):
    torch.manual_seed(0)
    return FusionModel(preset("tiny", codec.spec)).eval()


def run(gen, prefix):
    events = list(gen.run(prefix))
    assert isinstance(events[-1], GenerationDone)
    return events, events[-1]


def reply_tokens(model, done):
    lay = model.layout
    toks = [lay.assistant, *done.text_tokens, lay.eot]
    toks += lay.codes_to_tokens(done.codes).tolist()
    return torch.tensor(toks)


def test_config_round_trip_and_validation(codec):
    cfg = preset("tiny", codec.spec)
    assert FusionConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        cfg.replace(n_head=3)
    with pytest.raises(ValueError, match="modalities"):
        cfg.replace(modalities=("smell",))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge", codec.spec)


def test_losses_backward_and_per_module(model):
    cfg = model.config
    feats = random_features(cfg, batch=3)
    lay = model.layout
    g = torch.Generator().manual_seed(1)
    R = 30
    reply = torch.full((3, R), 0)
    lens = torch.tensor([30, 22, 26])
    for b in range(3):
        text = torch.randint(0, 1000, (3,), generator=g)
        codes = torch.randint(0, lay.bins, (lay.n_q, (lens[b] - 6) // lay.n_q), generator=g)
        seq = torch.cat([torch.tensor([lay.assistant]), text, torch.tensor([lay.eot]),
                         lay.codes_to_tokens(codes), torch.tensor([lay.eoa])])
        lens[b] = len(seq)
        reply[b, :len(seq)] = seq
    model.train()
    losses = model(feats, reply, lens)
    model.eval()
    assert len(losses.mctp) == cfg.mctp_k
    for v in [losses.text, losses.audio, *losses.mctp]:
        assert torch.isfinite(v) and v > 0
    # untrained: audio loss near log(bins) (masked to one codebook)
    assert abs(losses.audio.item() - math.log(lay.bins)) < 1.0
    losses.total.backward()
    assert model.mctp[0].proj.weight.grad is not None
    assert model.aggregator.queries.grad.abs().sum() > 0
    model.zero_grad()


def test_text_on_trains_some_replies_on_their_audio_alone(model):
    """FusionModel.forward(text_on=...): the replies it marks False add nothing to the text
    loss and all of their audio to the audio loss (lab.train_fusion's --swap-replies)."""
    cfg, lay = model.config, model.layout
    torch.manual_seed(3)
    feats = random_features(cfg, batch=2)
    seqs = []
    for n_text in (3, 5):
        codes = torch.randint(0, lay.bins, (lay.n_q, 2))
        seqs.append(torch.cat([torch.tensor([lay.assistant]), torch.randint(0, 1000, (n_text,)),
                               torch.tensor([lay.eot]), lay.codes_to_tokens(codes),
                               torch.tensor([lay.eoa])]))
    lens = torch.tensor([len(q) for q in seqs])
    reply = torch.zeros(2, int(lens.max()), dtype=torch.long)
    for b, q in enumerate(seqs):
        reply[b, :len(q)] = q
    with torch.no_grad():
        both = model(feats, reply, lens)
        first = model(feats, reply, lens, text_on=torch.tensor([True, False]))
        none = model(feats, reply, lens, text_on=torch.tensor([False, False]))
    assert (both.n_text, first.n_text, none.n_text) == (4 + 6, 4, 0)   # text tokens + EOT
    assert both.n_audio == first.n_audio == none.n_audio == 2 * (2 * lay.n_q + 1)
    assert first.audio == both.audio and first.text != both.text and none.text == 0


def test_pack_keeps_positions_contiguous(model):
    feats = random_features(model.config, batch=2)
    prefix = model.prefix(feats)
    reply = torch.tensor([[model.layout.assistant, 5, 6, 7], [model.layout.assistant, 8, 0, 0]])
    x, mask, targets = model.pack(prefix, reply, torch.tensor([4, 2]))
    p1 = int(prefix.length[1])
    assert mask[1].sum() == p1 + 2 and not mask[1, p1 + 2:].any()
    assert targets[1, p1] == 8 and (targets[1, p1 + 1:] == IGNORE).all()
    assert torch.equal(x[1, p1 + 1], model.embed.weight[8])


def test_backbone_is_causal(model):
    x = torch.randn(1, 20, model.config.d_model)
    y = x.clone()
    y[:, 12:] += torch.randn(8, model.config.d_model)  # not a constant: LayerNorm would remove it
    with torch.no_grad():
        hx, hy = model.backbone(x), model.backbone(y)
    assert torch.allclose(hx[:, :12], hy[:, :12], atol=1e-6)
    assert not torch.allclose(hx[:, 12:], hy[:, 12:])


@pytest.mark.parametrize("mode", ["vanilla", "mctp"])
def test_cached_generation_equals_full_forward(model, codec, mode):
    opts = GenerationOptions(mode=mode, max_text_tokens=4, max_audio_seconds=0.3)
    gen = Generator(model, codec, opts)
    prefix = model.prefix(random_features(model.config, seed=3))
    _, done = run(gen, prefix)
    lay = model.layout
    reply = reply_tokens(model, done)
    assert done.codes.shape[1] >= 1
    with torch.no_grad():
        x, mask, _ = model.pack(prefix, reply[None], torch.tensor([len(reply)]))
        h = model.backbone(x)
        P = int(prefix.length[0])
        n_text = len(done.text_tokens) + 1  # text + EOT
        # every text token is the argmax of the full forward at its position (an EOT forced
        # by max_text_tokens is not)
        forced = n_text == opts.max_text_tokens
        for j in range(n_text - forced):
            assert int(model.text_logits(h[0, P + j]).argmax()) == int(reply[j + 1])
        hs = [h] + (model.mctp.forward_train(h, x) if mode == "mctp" else [])
        audio = reply[1 + n_text:]
        K1 = len(hs)
        for i, tok in enumerate(audio.tolist()):
            k = i % K1                      # which level produced this token
            p = P + n_text + i - k          # position whose level-k hidden predicts it
            logits = model.audio_logits(hs[k][0, p], i % lay.n_q)
            assert int(logits.argmax()) + lay.eoa == tok, (mode, i, k)


def test_greedy_and_seeded_sampling_are_deterministic(model, codec):
    prefix = model.prefix(random_features(model.config, seed=5))
    for opts in [GenerationOptions(max_text_tokens=3, max_audio_seconds=0.2),
                 GenerationOptions(temperature=1.0, top_k=20, seed=7, max_text_tokens=3, max_audio_seconds=0.2)]:
        gen = Generator(model, codec, opts)
        a, b = run(gen, prefix)[1], run(gen, prefix)[1]
        assert a.text_tokens == b.text_tokens and torch.equal(a.codes, b.codes)
    s1 = run(Generator(model, codec, GenerationOptions(temperature=1.0, seed=1, max_text_tokens=6,
                                                       max_audio_seconds=0.2)), prefix)[1]
    s2 = run(Generator(model, codec, GenerationOptions(temperature=1.0, seed=2, max_text_tokens=6,
                                                       max_audio_seconds=0.2)), prefix)[1]
    assert s1.text_tokens != s2.text_tokens or not torch.equal(s1.codes, s2.codes)


def test_mctp_emits_k_plus_one_audio_tokens_per_backbone_forward(model, codec):
    K = model.config.mctp_k
    prefix = model.prefix(random_features(model.config, seed=4))
    stats = {}
    for mode in ["vanilla", "mctp"]:
        # EOA held off: an untrained model may end the reply at a different step in each mode
        opts = GenerationOptions(mode=mode, max_text_tokens=2, max_audio_seconds=0.4, min_audio_seconds=0.4)
        stats[mode] = run(Generator(model, codec, opts), prefix)[1].stats
    for mode, per_step in [("vanilla", 1), ("mctp", K + 1)]:
        s = stats[mode]
        audio_forwards = s.backbone_forwards - 1 - s.text_tokens  # minus prefill and text steps
        # the last step's tokens need no further backbone forward, unless EOA ended the reply
        assert per_step * audio_forwards <= s.audio_tokens <= per_step * (audio_forwards + 1), (mode, s)
    assert stats["mctp"].mctp_forwards == K * stats["mctp"].audio_tokens // (K + 1)
    assert stats["vanilla"].audio_tokens == stats["mctp"].audio_tokens


def test_events_stream_text_frames_and_pcm(model, codec):
    opts = GenerationOptions(max_text_tokens=3, max_audio_seconds=0.3, chunk_frames=2)
    events, done = run(Generator(model, codec, opts), model.prefix(random_features(model.config)))
    kinds = [type(e) for e in events]
    assert kinds.index(TextToken) < kinds.index(AudioFrame) < kinds.index(PCMChunk)
    pcm = [e for e in events if isinstance(e, PCMChunk)]
    total = sum(len(e.pcm) for e in pcm)
    assert total == done.codes.shape[1] * codec.hop_length
    times = [e.t for e in events]
    assert times == sorted(times)
    # streamed PCM equals one offline decode of all the codes
    import numpy as np
    full = codec.decode(done.codes[None])[0, 0].numpy()
    assert np.abs(np.concatenate([e.pcm for e in pcm]) - full).max() < 1e-4


def test_generation_options_validation():
    with pytest.raises(ValueError, match="mode"):
        GenerationOptions(mode="fast")
    with pytest.raises(ValueError, match="temperature"):
        GenerationOptions(temperature=-1)


def test_generator_memory_is_preallocated(model, codec):
    gen = Generator(model, codec, GenerationOptions(max_text_tokens=2, max_audio_seconds=0.2))
    sizes = (gen.E.data_ptr(), gen.cache.k.data_ptr(), gen.cache.nbytes)
    prefix = model.prefix(random_features(model.config))
    for _ in range(3):
        run(gen, prefix)
    assert (gen.E.data_ptr(), gen.cache.k.data_ptr(), gen.cache.nbytes) == sizes


def test_checkpoint_round_trip_and_mismatch(model, codec, tmp_path):
    path = save_model(model, tmp_path / "m.safetensors")
    cfg, _ = read_header(path)
    assert cfg == model.config
    loaded = load_model(path, device="cpu", codec=codec)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    other = build_codec("tiny")  # fresh random weights: a different codec
    with pytest.raises(CheckpointError, match="codec mismatch"):
        load_model(path, codec=other)
    with pytest.raises(FileNotFoundError, match="train"):
        load_model(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-not-a-header")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(bad)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_model(trunc)


def test_int8_embedding_round_trip(model, codec, tmp_path):
    """The shipped format: the token embedding and the MCTP modules' matrices as int8 rows +
    one scale each, every other tensor fp16; the loader restores floats within half a step of
    each row's scale."""
    from fusion.checkpoint import SHIPPED_INT8, quantize_rows
    half = save_model(model, tmp_path / "h.safetensors", half=True)
    q8 = save_model(model, tmp_path / "q.safetensors", half=True, int8=SHIPPED_INT8)
    assert q8.stat().st_size < half.stat().st_size
    a, b = load_model(half, codec=codec).state_dict(), load_model(q8, codec=codec).state_dict()
    mctp = sorted(k for k, v in a.items() if k.startswith("mctp.") and v.dim() == 2)
    assert mctp and any(k.endswith("pos.weight") for k in mctp)
    assert sorted(k for k in a if not torch.equal(a[k], b[k])) == sorted(["embed.weight", *mctp])
    for k in ["embed.weight", *mctp]:
        w = model.state_dict()[k]
        _, scale = quantize_rows(w)
        err = (b[k] - w).abs()
        assert (err <= scale[:, None] * 0.5 + 1e-6).all() and err.max() > 0, k
    with pytest.raises(AssertionError):
        quantize_rows(torch.zeros(3))


def test_tokenizer_mismatch_refused(model, tmp_path):
    bad = model.config.replace(n_text=1000)
    m = FusionModel.__new__(FusionModel)  # only the config is read before the refusal
    torch.nn.Module.__init__(m)
    m.config = bad
    path = tmp_path / "tok.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "tandem-fusion", "version": "1",
                                                          "config": bad.to_json()})
    with pytest.raises(CheckpointError, match="tokenizer mismatch"):
        load_model(path)


def test_ablation_configs_run(codec):
    from lab.train_fusion import ABLATIONS
    full = preset("tiny", codec.spec, pooled_clues=True, cell_query=True, sound_cells=True, question_query=True,
                  clue_readout=True)
    for name in ("mean", "vision", "audio"):
        m = FusionModel(full.replace(**ABLATIONS[name])).eval()
        feats = random_features(m.config, batch=2)
        p = m.prefix(feats)
        assert torch.isfinite(p.embeds).all()
        p1 = m.prefix(random_features(m.config, batch=1))
        ev, done = run(Generator(m, codec, GenerationOptions(max_text_tokens=2, max_audio_seconds=0.1)), p1)
        assert done.stats.backbone_forwards > 0


@pytest.mark.parametrize("query_clues", ["all", "audio"])
def test_question_query_starts_the_reply_from_question_and_clues(codec, query_clues):
    torch.manual_seed(0)
    m = FusionModel(preset("tiny", codec.spec, pooled_clues=True, question_query=True,
                           query_clues=query_clues)).eval()
    f = random_features(m.config, batch=2)
    p = m.prefix(f)
    assert p.start.shape == (2, m.config.d_model)
    # the reply's first input is the start vector, at the first position after the prefix
    reply = torch.tensor([[m.layout.assistant, 11, m.layout.eot]] * 2)
    x, _, _ = m.pack(p, reply, torch.tensor([3, 3]))
    for b, P in enumerate(p.length.tolist()):
        assert torch.equal(x[b, P], p.start[b]) and torch.equal(x[b, P + 1], m.embed.weight[11])
    # a scene change reaches the start vector directly (no attention hop needed)
    g = dataclasses.replace(f, audio=f.audio + torch.randn_like(f.audio))
    assert ((m.prefix(g).start - p.start).abs().amax(-1) > 1e-4).all()
    # with "audio" only the scene audio does: a changed frame leaves the start vector alone
    v = dataclasses.replace(f, frames=f.frames + torch.randn_like(f.frames))
    moved = ((m.prefix(v).start - p.start).abs().amax(-1) > 1e-4).all()
    assert bool(moved) == (query_clues == "all")
    # so does a question change; without the option the reply starts from the ASSISTANT token
    h = dataclasses.replace(f, question=f.question + torch.randn_like(f.question))
    assert ((m.prefix(h).start - p.start).abs().amax(-1) > 1e-4).all()
    plain = FusionModel(preset("tiny", codec.spec)).eval()
    assert plain.prefix(f).start is None and plain.c_query is None
    # generation starts from the same vector: its first token is the teacher-forced argmax
    p1 = m.prefix(random_features(m.config, seed=4))
    _, done = run(Generator(m, codec, GenerationOptions(max_text_tokens=3, max_audio_seconds=0.1)), p1)
    first = done.text_tokens[0] if done.text_tokens else m.layout.eot
    with torch.no_grad():
        x, _, _ = m.pack(p1, torch.tensor([[m.layout.assistant, first]]), torch.tensor([2]))
        h = m.backbone(x)
    assert int(m.text_logits(h[0, int(p1.length[0])]).argmax()) == first


def test_pooled_clues_join_the_prefix_and_carry_the_scene(codec):
    torch.manual_seed(0)
    m = FusionModel(preset("tiny", codec.spec, pooled_clues=True)).eval()
    cells = m.config.vision.grid[0] * m.config.vision.grid[1]
    assert m.config.n_prefix_clues == m.config.n_clues + cells + 1
    f = random_features(m.config, batch=2)
    p = m.prefix(f)
    assert p.embeds.shape[1] == m.config.n_prefix_clues + math.ceil(f.question.shape[1] / m.config.question_pool)
    pool = m.config.question_pool
    assert p.length.tolist() == (m.config.n_prefix_clues + (f.question_len + pool - 1) // pool).tolist()
    # a visual token of one cell changes exactly that cell's pooled clue (and the CAT clues)
    g = dataclasses.replace(f, frames=f.frames.clone())
    g.frames[:, :, 4] += 1.0
    q = m.prefix(g)
    pooled = slice(m.config.n_clues, m.config.n_prefix_clues)
    changed = (q.embeds[:, pooled] - p.embeds[:, pooled]).abs().amax(-1) > 1e-4   # (B, cells+1)
    assert changed[:, 4].all() and changed.sum().item() == 2, changed
    ev, done = run(Generator(m, codec, GenerationOptions(max_text_tokens=2, max_audio_seconds=0.1)),
                   m.prefix(random_features(m.config, batch=1)))
    assert done.stats.backbone_forwards > 0


def test_pooled_cells_of_the_last_frame_ignore_older_frames(codec):
    torch.manual_seed(0)
    m = FusionModel(preset("tiny", codec.spec, pooled_clues=True, pooled_frame="last")).eval()
    f = random_features(m.config, batch=2)
    f.frame_mask[1, -3:] = False                             # item 1's last valid frame is -4
    p = m.prefix(f)
    pooled = slice(m.config.n_clues, m.config.n_prefix_clues - 1)              # the cells
    def cells_after(edit):
        g = dataclasses.replace(f, frames=f.frames.clone())
        edit(g.frames)
        return (m.prefix(g).embeds[:, pooled] - p.embeds[:, pooled]).abs().amax(-1) > 1e-4  # (B, cells)
    older = cells_after(lambda x: x[:, :-4].add_(1.0))       # frames before either item's last
    assert not older.any(), older
    last = cells_after(lambda x: (x[0, -1].add_(1.0), x[1, -4].add_(1.0)))
    assert last.all(), last
    masked = cells_after(lambda x: x[1, -1].add_(1.0))       # a masked frame counts for nothing
    assert not masked[1].any(), masked
    with pytest.raises(ValueError, match="pooled_frame"):
        preset("tiny", codec.spec, pooled_frame="first")


def _trains_and_is_validated(m, module, f, codec, option):
    """The option's module gets gradients, and the option alone (without what it needs) is refused."""
    m.train()(f, *_text_replies(m, 2)).total.backward()
    assert all(p.grad is not None for p in module.parameters())
    with pytest.raises(ValueError, match=option):
        preset("tiny", codec.spec, **{option: True})


def test_clue_readout_selects_clues_by_content_for_the_reply_start(codec):
    from fusion.aggregator import ClueReadout
    torch.manual_seed(0)
    r = ClueReadout(32, 4)
    q, clues = torch.randn(2, 32), torch.randn(2, 7, 32)
    perm = torch.randperm(7)
    # a look-up by content: the clues' order does not matter (the flattened map's does)
    assert torch.allclose(r(q, clues), r(q, clues[:, perm]), atol=1e-6)
    # one clue that matches the question's query dominates the read-out
    with torch.no_grad():
        r.attn.q.weight.copy_(torch.eye(32) * 10), r.attn.kv.weight[:32].copy_(torch.eye(32) * 10)
        r.attn.q.bias.zero_(), r.attn.kv.bias.zero_()
    target = clues.clone()
    target[:, 3] = r.ln_q(q).detach() * 3                    # clue 3 "is" what the question asks
    alone = r(q, target[:, 3:4])
    assert torch.allclose(r(q, target), alone, atol=1e-2), (r(q, target) - alone).abs().max()
    # in the model: with the audio-only map, frames now reach the start vector through the read-out
    m = FusionModel(preset("tiny", codec.spec, pooled_clues=True, question_query=True,
                           query_clues="audio", clue_readout=True)).eval()
    f = random_features(m.config, batch=2)
    v = dataclasses.replace(f, frames=f.frames + torch.randn_like(f.frames))
    assert ((m.prefix(v).start - m.prefix(f).start).abs().amax(-1) > 1e-5).all()
    _trains_and_is_validated(m, m.readout, f, codec, "clue_readout")


def test_sound_cells_give_each_cell_clue_its_pulse_while_beep_evidence(codec):
    torch.manual_seed(0)
    kw = dict(pooled_clues=True, pooled_frame="last", av_sync=False)   # no other audio->cell path
    m = FusionModel(preset("tiny", codec.spec, sound_cells=True, **kw)).eval()
    plain = FusionModel(preset("tiny", codec.spec, **kw)).eval()
    with torch.no_grad():  # weights as after training: the std-0.02 init keeps its effects tiny
        for p in m.sound_cells.parameters():
            p.normal_(0.0, 0.3)
    f = random_features(m.config, batch=2)                   # questions start at -1.2 s or later
    cells = slice(m.config.n_clues, m.config.n_prefix_clues - 1)

    def changed(model, g):
        return ((model.prefix(g).embeds - model.prefix(f).embeds).abs().amax(-1) > 1e-4)[:, cells]
    # an older frame of cell 2 (heard audio around it) reaches cell 2's clue only
    g = dataclasses.replace(f, frames=f.frames.clone())
    g.frames[:, 1, 2] += torch.randn_like(g.frames[:, 1, 2])  # (not a constant: LayerNorm drops it)
    c = changed(m, g)
    assert c[:, 2].all() and c.sum().item() == 2, c
    assert not changed(plain, g).any()                       # last-frame cells alone ignore it
    # scene audio before the question reaches every cell; audio during the question none
    before = (f.audio_times > -3.2) & (f.audio_times < -2.8)
    g = dataclasses.replace(f, audio=f.audio + 3.0 * before[..., None] * torch.randn_like(f.audio))
    assert changed(m, g).all() and not changed(plain, g).any()
    during = f.audio_times > -0.5
    g = dataclasses.replace(f, audio=f.audio + 3.0 * during[..., None] * torch.randn_like(f.audio))
    assert not changed(m, g).any()
    _trains_and_is_validated(m, m.sound_cells, f, codec, "sound_cells")


def test_cell_query_makes_each_cell_clue_ask_the_question_of_its_own_history(codec):
    torch.manual_seed(0)
    kw = dict(pooled_clues=True, pooled_frame="last")
    m = FusionModel(preset("tiny", codec.spec, cell_query=True, **kw)).eval()
    plain = FusionModel(preset("tiny", codec.spec, **kw)).eval()
    with torch.no_grad():  # weights as after training: the std-0.02 init keeps its effects ~1e-5
        for p in m.cell_query.parameters():
            p.normal_(0.0, 0.3)
    assert m.config.n_prefix_clues == plain.config.n_prefix_clues
    f = random_features(m.config, batch=2)
    cells = slice(m.config.n_clues, m.config.n_prefix_clues - 1)
    audio = m.config.n_prefix_clues - 1

    def changed(model, g):
        d = (model.prefix(g).embeds - model.prefix(f).embeds).abs().amax(-1) > 1e-4   # (B, P)
        return d[:, cells], d[:, audio]
    # an older frame of cell 2 reaches cell 2's clue (not only the last frame) and no other cell
    g = dataclasses.replace(f, frames=f.frames.clone())
    g.frames[:, 1, 2] += 1.0
    c, a = changed(m, g)
    assert c[:, 2].all() and c.sum().item() == 2 and not a.any(), c
    assert not changed(plain, g)[0].any()                   # last-frame cells alone ignore it
    # the question reaches every cell clue (and not the plain pooled cells)
    g = dataclasses.replace(f, question=f.question + torch.randn_like(f.question))
    assert changed(m, g)[0].all() and not changed(plain, g)[0].any()
    # trained and validated
    _trains_and_is_validated(m, m.cell_query, f, codec, "cell_query")


def _text_replies(m, batch):
    lay = m.layout
    reply = torch.tensor([[lay.assistant, 11, 12, lay.eot]] * batch)
    return reply, torch.full((batch,), 4)


def test_scene_audio_stops_at_the_question_and_frames_carry_what_was_heard(codec):
    torch.manual_seed(0)
    m = FusionModel(preset("tiny", codec.spec, pooled_clues=True)).eval()
    assert m.config.av_sync and m.config.scene_audio_only
    cells = m.config.vision.grid[0] * m.config.vision.grid[1]
    f = random_features(m.config, batch=2)
    p = m.prefix(f)
    q_start = -f.question_len[:, None] / 50.0                                    # (B, 1) seconds
    # the user's own speech (scene audio after the question starts) changes nothing
    g = dataclasses.replace(f, audio=f.audio.clone())
    g.audio[f.audio_times >= q_start] += 3.0
    assert torch.equal(m.prefix(g).embeds, p.embeds)
    # scene audio before it does: its pooled clue and, through av_sync, every cell's
    g = dataclasses.replace(f, audio=f.audio.clone())
    g.audio[(f.audio_times < q_start) & (f.audio_times > q_start - 1.0)] += 3.0
    pooled = slice(m.config.n_clues, m.config.n_prefix_clues)
    changed = (m.prefix(g).embeds[:, pooled] - p.embeds[:, pooled]).abs().amax(-1) > 1e-4
    assert changed.all() and changed.shape[1] == cells + 1, changed
    # without av_sync only the audio clue would move
    m2 = FusionModel(preset("tiny", codec.spec, pooled_clues=True, av_sync=False)).eval()
    changed = (m2.prefix(g).embeds[:, pooled] - m2.prefix(f).embeds[:, pooled]).abs().amax(-1) > 1e-4
    assert changed[:, -1].all() and changed.sum().item() == 2, changed


def test_hf_backbone_tiny_random(codec):
    import transformers  # noqa: F401  (a test dependency: requirements-dev.txt)
    hf = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, vocab_size=64, max_position_embeddings=512)
    m = FusionModel(preset("tiny", codec.spec, backbone="hf", hf_config=hf)).eval()
    prefix = m.prefix(random_features(m.config))
    for mode in ["vanilla", "mctp"]:
        _, done = run(Generator(m, codec, GenerationOptions(mode=mode, max_text_tokens=3, max_audio_seconds=0.2)), prefix)
        reply = reply_tokens(m, done)
        with torch.no_grad():
            x, _, _ = m.pack(prefix, reply[None], torch.tensor([len(reply)]))
            h = m.backbone(x)
        P = int(prefix.length[0])
        assert int(m.text_logits(h[0, P]).argmax()) == int(reply[1])


def test_question_chunks_reuse_the_scene_audio_encoded_while_it_was_spoken(codec):
    import numpy as np
    from fusion.inputs import SceneEncoder
    pcm = 0.1 * np.random.default_rng(0).standard_normal(56_000).astype(np.float32)  # 3.5 s
    calls = {}
    for chunks in (False, True):
        torch.manual_seed(0)
        m = FusionModel(preset("tiny", codec.spec, question_chunks=chunks)).eval()
        enc = SceneEncoder(m)
        enc.push_audio(pcm)                                    # 3 whole chunks encoded
        seen = []
        real = m.encode_audio
        m.encode_audio = lambda mel, lengths=None: (seen.append(mel.shape[-1]), real(mel, lengths))[1]
        f = enc.features(1.2, 3.5)
        calls[chunks] = seen
        rel = f.audio_times[0]                                 # seconds before the question's end
        span = f.audio[0][rel >= 1.2 - 3.5]                    # the scene audio over the question
        assert f.question_len[0] == f.question.shape[1] == len(span) == 115
        assert torch.equal(f.question[0], span) == chunks
    # the turn end encodes the last half chunk (50 mel frames), and the whole question only without
    assert calls == {False: [50, 230], True: [50]}, calls
