"""The alignment model: scores, loss, BRNN, training on a synthetic set with a known answer, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vsa.alignment.model import ReluBRNN, last_state, load_aligner, pair_scores, ranking_loss
from vsa.alignment.train import configs, epoch_order, parse_overrides, train

from tests.synth_align import WORDS, make_synthetic

torch.set_num_threads(1)


def _vm(V):
    return torch.ones(V.shape[:2], dtype=torch.bool)


def test_pair_scores_paper_formula_by_hand():
    # one image with 2 regions, one sentence with 3 words (h = 2)
    V = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    S = torch.tensor([[[2.0, 1.0], [-1.0, 3.0], [-1.0, -2.0]]])
    # v.s: word 0 -> (2, 1), word 1 -> (-1, 3), word 2 -> (-1, -2)
    sm = _vm(S)
    assert pair_scores(V, _vm(V), S, sm, "sum-max").item() == pytest.approx(2 + 3 - 1)
    assert pair_scores(V, _vm(V), S, sm, "mean-max").item() == pytest.approx(4 / 3)
    assert pair_scores(V, _vm(V), S, sm, "sum-all").item() == pytest.approx(2 + 1 + 3)


def test_scan_score_tends_to_the_max_score_at_low_temperature():
    g = torch.Generator().manual_seed(1)
    V = torch.nn.functional.normalize(torch.randn(2, 3, 4, generator=g), dim=-1)
    S = torch.nn.functional.normalize(torch.randn(2, 5, 4, generator=g), dim=-1)
    vm, sm = _vm(V), _vm(S)
    hard = pair_scores(V, vm, S, sm, "scan", scan_lambda=1e3)
    assert torch.allclose(hard, pair_scores(V, vm, S, sm, "mean-max"), atol=1e-4)
    soft = pair_scores(V, vm, S, sm, "scan", scan_lambda=1.0)
    assert not torch.allclose(soft, hard, atol=1e-3)


def test_pair_scores_ignore_padding():
    V = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [50.0, 50.0]]])
    vm = torch.tensor([[True, True, False]])  # the third region is padding
    S = torch.tensor([[[2.0, 1.0], [-1.0, 3.0], [9.0, 9.0]]])
    sm = torch.tensor([[True, True, False]])  # the third word is padding
    assert pair_scores(V, vm, S, sm, "sum-max").item() == pytest.approx(5)
    assert pair_scores(V, vm, S, sm, "mean-max").item() == pytest.approx(2.5)


def test_pair_scores_matrix_matches_one_by_one():
    g = torch.Generator().manual_seed(0)
    V = torch.randn(3, 4, 8, generator=g)
    vm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    S = torch.randn(5, 6, 8, generator=g)
    lengths = torch.tensor([6, 1, 3, 4, 2])
    sm = torch.arange(6)[None] < lengths[:, None]
    for score in ("sum-max", "mean-max", "sum-all", "global", "scan"):
        M = pair_scores(V, vm, S, sm, score)
        for i in range(3):
            for j in range(5):
                r, t = int(vm[i].sum()), int(lengths[j])
                one = pair_scores(V[i : i + 1, :r], vm[i : i + 1, :r], S[j : j + 1, :t], sm[j : j + 1, :t], score)
                assert M[i, j].item() == pytest.approx(one.item(), abs=1e-5), score


def test_ranking_loss_by_hand():
    s = torch.tensor([[1.0, 0.5, 0.95], [0.2, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # margin 0.2: image 0 vs sentences 1 (0.5 -> 0 violation? 0.2+0.5-1 < 0) and 2 (0.2+0.95-1 = 0.15)
    # sentence 0 vs images 1 (0.2+0.2-1<0), 2 (0); sentence 2 vs image 0 (0.2+0.95-1 = 0.15)
    assert ranking_loss(s, margin=0.2).item() == pytest.approx((0.15 + 0.15) / 3)
    assert ranking_loss(s, margin=0.2, hardest=True).item() == pytest.approx((0.15 + 0.15) / 3)
    s2 = s.clone()
    s2[0, 1] = 0.9  # a second violation for image 0 (0.1): sum counts both, hardest only the larger
    assert ranking_loss(s2, margin=0.2).item() == pytest.approx((0.15 + 0.1 + 0.15 + 0.1) / 3)
    assert ranking_loss(s2, margin=0.2, hardest=True).item() == pytest.approx((0.15 + 0.15 + 0.1) / 3)
    # well separated: no loss
    assert ranking_loss(torch.eye(4) * 2, margin=0.2).item() == 0


def test_ranking_loss_never_uses_same_image_sentences_as_negatives():
    # 2 images, 4 sentences: 0, 1 of image 0; 2, 3 of image 1. Sentence 1 scores high with image 0
    # but is also image 0's: no violation.
    s = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert ranking_loss(s, torch.tensor([0, 0, 1, 1]), margin=0.5).item() == 0
    s[1, 0] = 0.9  # image 1 scores sentence 0 almost as high as image 0 does -> violations both ways
    assert ranking_loss(s, torch.tensor([0, 0, 1, 1]), margin=0.5).item() > 0


def test_relu_brnn_respects_lengths():
    torch.manual_seed(0)
    rnn = ReluBRNN(6)
    e = torch.randn(2, 5, 6).relu()
    lengths = torch.tensor([5, 3])
    out = rnn(e, lengths)
    alone = rnn(e[1:, :3], torch.tensor([3]))
    assert torch.allclose(out[1, :3], alone[0], atol=1e-6)  # padding does not leak into the backward pass
    assert out[1, 3:].abs().sum() == 0
    wider = rnn(torch.cat((e, torch.randn(2, 2, 6)), 1), lengths)  # padding past the longest sentence: steps with none
    assert torch.allclose(wider[:, :5], out, atol=1e-6) and wider[:, 5:].abs().sum() == 0
    # the backward pass really runs backwards: the first output depends on the last word
    e2 = e.clone()
    e2[0, 4] += 1.0
    assert not torch.allclose(rnn(e2, lengths)[0, 0], out[0, 0])


def test_relu_brnn_gradients_are_the_papers_recurrence_run_one_sentence_at_a_time():
    torch.manual_seed(0)
    rnn = ReluBRNN(6)
    e = torch.randn(3, 5, 6, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])
    w = torch.randn(3, 5, 6)
    (rnn(e, lengths) * w).sum().backward()
    got_e, got_W = e.grad.clone(), rnn.W.grad.clone()
    e.grad, rnn.W.grad = None, None
    total = 0
    for i, n in enumerate(lengths.tolist()):  # eq. 4-5 written out, one sentence, one direction at a time
        x = e[i, :n]
        hf, hb, fwd, bwd = torch.zeros(6), torch.zeros(6), [], [None] * n
        for t in range(n):
            hf = torch.relu(x[t] + hf @ rnn.W[0] + rnn.b[0, 0])
            fwd.append(hf)
        for t in reversed(range(n)):
            hb = torch.relu(x[t] + hb @ rnn.W[1] + rnn.b[1, 0])
            bwd[t] = hb
        total = total + ((torch.stack(fwd) + torch.stack(bwd)) * w[i, :n]).sum()
    total.backward()
    assert torch.allclose(got_e, e.grad, atol=1e-5) and torch.allclose(got_W, rnn.W.grad, atol=1e-5)


def test_last_state_is_the_padded_grus_state_at_each_sentences_last_word():
    torch.manual_seed(0)
    gru = torch.nn.GRU(4, 5, batch_first=True)
    x = torch.randn(3, 6, 4)
    lengths = torch.tensor([2, 6, 4])  # unsorted, one without padding
    padded = gru(x)[0][torch.arange(3), lengths - 1]
    got = last_state(gru, x, lengths)
    assert torch.allclose(got, padded, atol=1e-6)
    x2 = x.clone()
    x2[0, 2:] += 5.0  # padding after the first sentence's last word changes nothing
    assert torch.allclose(last_state(gru, x2, lengths)[0], got[0], atol=1e-6)
    assert not torch.allclose(last_state(gru, x2, torch.tensor([3, 6, 4]))[0], got[0])


def test_last_state_written_out_has_the_gru_modules_values_and_gradients():
    torch.manual_seed(0)
    gru = torch.nn.GRU(4, 5, batch_first=True)
    x = torch.randn(5, 7, 4, requires_grad=True)
    lengths = torch.tensor([3, 7, 1, 5, 0])  # unsorted, an empty sentence (read as one word, as torch packs it)
    w = torch.randn(5, 5)
    got = last_state(gru, x, lengths)  # the CPU path: the recurrence written out
    grads = torch.autograd.grad((got * w).sum(), [x, *gru.parameters()])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1), batch_first=True, enforce_sorted=False)
    ref = gru(packed)[1][-1]  # the module itself (its packed CPU kernel)
    ref_grads = torch.autograd.grad((ref * w).sum(), [x, *gru.parameters()])
    assert torch.allclose(got, ref, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6)
    assert grads[0][0, 3:].abs().sum() == 0  # nothing flows into the padding
    # dropout given to it touches the real words only: zeroing them all is the run on zero inputs
    assert torch.allclose(last_state(gru, x, lengths, lambda d: d * 0), last_state(gru, x * 0, lengths), atol=1e-7)


@pytest.mark.parametrize("rnn", ["brnn", "gru", "lstm"])
def test_sentence_rnn_values_and_gradients_are_those_of_the_padded_computation(rnn):
    from vsa.alignment.model import SentenceBRNN, _l2

    torch.manual_seed(0)
    m = SentenceBRNN(50, 8, 6, rnn, dropout=0.0)
    ids = torch.randint(1, 50, (4, 7))
    lengths = torch.tensor([3, 7, 1, 5])
    ids = ids * (torch.arange(7)[None] < lengths[:, None])
    words = torch.arange(7)[None] < lengths[:, None]
    w = torch.randn(4, 7, 6)
    out = m(ids, lengths)
    got = torch.autograd.grad((out * w)[words].sum(), list(m.parameters()), allow_unused=True)
    # the layers around the recurrence over every position, padding included (the code before)
    e = torch.relu(m.inp(m.embed(ids)))
    if rnn == "brnn":
        h = m.rnn(e, lengths)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(e, lengths, batch_first=True, enforce_sorted=False)
        h = torch.nn.utils.rnn.pad_packed_sequence(m.rnn(packed)[0], batch_first=True, total_length=7)[0]
        h = h[..., :6] + h[..., 6:]
    ref = _l2(torch.relu(m.out(h)))
    want = torch.autograd.grad((ref * w)[words].sum(), list(m.parameters()), allow_unused=True)
    assert torch.allclose(out[words], ref[words], atol=1e-6)
    assert out[~words].abs().sum() == 0 and ref[~words].abs().sum() > 0  # zero at padding (the bias's value before)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


def test_epoch_order_is_a_permutation_with_groups():
    owner = torch.arange(10).repeat_interleave(5)
    o = epoch_order(owner, 2, 3)
    assert sorted(o.tolist()) == list(range(50))
    pairs = sum(int(owner[o[i]] == owner[o[i + 1]]) for i in range(49))
    assert pairs >= 20  # each image's 5 sentences come as 2 + 2 + 1
    assert torch.equal(o, epoch_order(owner, 2, 3)) and not torch.equal(o, epoch_order(owner, 2, 4))


# small and explicit: a mean-word global term, no branch loss, val after every epoch
SMALL = dict(hidden=32, embed=16, epochs=5, batch_size=32, lr=3e-3, min_count=1, lr_decay=1.0, threads=1,
             global_encoder="mean", branch_loss=0.0, val_every=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("align")
    ds, feats, objs = make_synthetic(tmp, n_train=80, n_val=30, n_test=30)
    res = train(*configs(**SMALL), ds, feats, tmp / "a.pt", info=lambda *a: None)
    return tmp, ds, feats, objs, res


def test_loss_falls_and_retrieval_learns_the_known_answer(trained):
    tmp, ds, feats, objs, res = trained
    from vsa.io import read_jsonl

    log = read_jsonl(tmp / "a.log.jsonl")
    assert len(log) == 5 and [r["epoch"] for r in log] == [1, 2, 3, 4, 5]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    # chance R@1 on 30 val images is ~3%
    assert res["best"]["i2t"]["r1"] >= 60 and res["best"]["t2i"]["r1"] >= 40


def test_word_region_scores_point_at_the_named_objects(trained):
    tmp, ds, feats, objs, _ = trained
    from vsa.features.store import load_features

    al = load_aligner(tmp / "a.pt")
    st = load_features(feats)
    hits = n = 0
    for rec, o in list(zip(ds.images, objs))[-30:]:  # test images
        tokens = ["a", WORDS[o[0]], "and", "a", WORDS[o[1]]]
        m = al.word_region_scores(st[rec.key], tokens)
        assert m.shape == (5, 4)
        labels = st.labels(rec.key)
        for t in (1, 4):
            hits += labels[int(m[t].argmax())] == tokens[t]
            n += 1
    assert hits / n >= 0.8


def test_checkpoint_round_trip(trained):
    tmp, ds, feats, _, res = trained
    from vsa.checkpoint import load_checkpoint
    from vsa.features.store import load_features
    from vsa.retrieval import retrieval_metrics, score_matrix
    from vsa.splits import retrieval_split

    ck = load_checkpoint(tmp / "a.pt", kind="align")
    assert ck["model"]["hidden"] == 32 and ck["train"]["lr"] == 3e-3 and ck["extractor"]["extractor"] == "synthetic"
    assert ck["meta"]["epoch"] == res["best"]["epoch"] and "dog" in ck["vocab"]
    al = load_aligner(tmp / "a.pt")
    assert al.vocab.encode(["dog"]) != [al.vocab.unk]
    data = retrieval_split(ds, "val", load_features(feats), al.vocab, al.cfg.max_regions, al.cfg.max_len)
    m = retrieval_metrics(score_matrix(al.model, data.feats, data.rmask, data.ids, data.lengths), data.sent_image.numpy())
    assert m["rsum"] == pytest.approx(res["best"]["rsum"])  # the saved model is the best-on-val one
    # one pair through the Aligner API = the batched matrix
    st = load_features(feats)
    k = data.keys[0]
    toks = ds.split("val")[0].sentences[0].tokens
    full = score_matrix(al.model, data.feats[:1], data.rmask[:1], data.ids[:1], data.lengths[:1])
    assert al.score(st[k], toks) == pytest.approx(float(full[0, 0]), abs=1e-5)


def _tensors(path):
    from vsa.checkpoint import load_checkpoint

    return load_checkpoint(path)["state_dict"]


def test_same_seed_same_checkpoint_tensors(tmp_path):
    ds, feats, _ = make_synthetic(tmp_path, n_train=40, n_val=10, n_test=10)
    kw = {**SMALL, "epochs": 2}
    train(*configs(**kw, seed=7), ds, feats, tmp_path / "a.pt", info=lambda *a: None)
    train(*configs(**kw, seed=7), ds, feats, tmp_path / "b.pt", info=lambda *a: None)
    train(*configs(**kw, seed=8), ds, feats, tmp_path / "c.pt", info=lambda *a: None)
    a, b, c = _tensors(tmp_path / "a.pt"), _tensors(tmp_path / "b.pt"), _tensors(tmp_path / "c.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_continues_to_the_same_result(tmp_path):
    ds, feats, _ = make_synthetic(tmp_path, n_train=40, n_val=10, n_test=10)
    kw = {**SMALL, "epochs": 3}
    train(*configs(**kw), ds, feats, tmp_path / "full.pt", info=lambda *a: None)
    train(*configs(**{**kw, "epochs": 2}), ds, feats, tmp_path / "part.pt", info=lambda *a: None)
    res = train(*configs(**kw), ds, feats, tmp_path / "part.pt", resume=True, epochs=3, info=lambda *a: None)
    assert res["epochs"] == 1
    a, b = _tensors(tmp_path / "full.last.pt"), _tensors(tmp_path / "part.last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_schedule_counts_epochs_from_1(tmp_path):
    from vsa.io import read_jsonl

    ds, feats, _ = make_synthetic(tmp_path, n_train=40, n_val=10, n_test=10)
    kw = {**SMALL, "epochs": 4, "lr_decay": 0.5, "lr_decay_start": 1, "lr_decay_every": 2, "warmup_epochs": 2}
    lines = []
    train(*configs(**kw), ds, feats, tmp_path / "a.pt", info=lines.append)
    log = read_jsonl(tmp_path / "a.log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2, 3, 4] and any(x.startswith("epoch 1/4 ") for x in lines)
    # lr for lr_decay_start = 1 epoch, then halved every 2 epochs; the sum of violations for warmup_epochs = 2
    assert [r["lr"] for r in log] == pytest.approx([3e-3, 1.5e-3, 1.5e-3, 7.5e-4])
    assert [r["hardest"] for r in log] == [False, False, True, True]


def test_a_former_setting_name_trains_with_a_note_on_stderr(tmp_path):
    from tests.conftest import run_cli
    from vsa.io import write_json

    ds, feats, _ = make_synthetic(tmp_path, n_train=20, n_val=6, n_test=6)
    write_json(tmp_path / "synthetic.json", ds.to_karpathy())
    r = run_cli("train-align", "--dataset", tmp_path / "synthetic.json", "--features", feats, "-o", tmp_path / "a.pt",
                "--epochs", "1", "--batch-size", "16", "--hidden", "16", "--min-count", "1", "--threads", "1",
                "--set", "embed=8", "--set", "clip=1", "--set", "amp=false", "--json")
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert "warning: --set clip=1: read as grad_clip=1.0 (clip is now named grad_clip)" in err
    assert "warning: --set amp=false: read as bf16=False (amp is now named bf16)" in err
    from vsa.checkpoint import load_checkpoint

    t = load_checkpoint(tmp_path / "a.pt")["train"]
    assert (t["grad_clip"], t["bf16"]) == (1.0, False) and "clip" not in t and "amp" not in t


def test_validating_every_second_epoch_trains_the_same_weights_and_selects_among_validated_epochs(tmp_path):
    import json

    ds, feats, _ = make_synthetic(tmp_path, n_train=40, n_val=10, n_test=10)
    kw = {**SMALL, "epochs": 3}
    train(*configs(**kw), ds, feats, tmp_path / "all.pt", info=lambda *a: None)
    lines = []
    res = train(*configs(**{**kw, "val_every": 2}), ds, feats, tmp_path / "some.pt", info=lines.append)
    log = [json.loads(x) for x in (tmp_path / "some.log.jsonl").read_text().splitlines()]
    assert ["val" in r for r in log] == [False, True, True]  # epoch 2, and the last
    assert not log[0]["best"] and any("epoch 1/3" in x and "not validated" in x for x in lines)
    assert res["best"]["epoch"] in (2, 3)
    a, b = _tensors(tmp_path / "all.last.pt"), _tensors(tmp_path / "some.last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # validation draws no random numbers
    full = [json.loads(x) for x in (tmp_path / "all.log.jsonl").read_text().splitlines()]
    assert [r["val"]["rsum"] for r in full[1:]] == [r["val"]["rsum"] for r in log[1:]]


def test_region_drop_leaves_out_whole_regions_but_never_the_whole_image_and_only_in_training():
    from vsa.alignment.model import AlignModelConfig, BRNNAligner, check_config
    from vsa.errors import VsaError

    torch.manual_seed(0)
    m = BRNNAligner(AlignModelConfig(hidden=8, embed=4, region_drop=0.3), 10, 6)
    feats, rmask = torch.randn(400, 5, 6), torch.ones(400, 5, dtype=torch.bool)
    rmask[:, 4] = False  # a padded row stays padded
    V, vm = m.embed_images(feats, rmask)
    assert bool(vm[:, 0].all()) and not bool(vm[:, 4].any())
    assert abs(float(vm[:, 1:4].float().mean()) - 0.7) < 0.05
    assert bool((V[~vm] == 0).all()) and bool((V[vm].norm(dim=-1) > 0.99).all())
    m.eval()
    assert torch.equal(m.embed_images(feats, rmask)[1], rmask)
    with pytest.raises(VsaError, match="region_drop"):
        check_config(AlignModelConfig(region_drop=1.0))


def test_dropout_keeps_each_value_with_probability_1_minus_p_and_rescales():
    from vsa.nn import Dropout

    torch.manual_seed(0)
    d = Dropout(0.2)
    x = torch.ones(200_000)
    y = d(x)
    assert set(torch.unique(y).tolist()) == {0.0, 1.25}
    assert abs(float((y == 0).float().mean()) - 0.2) < 0.005
    assert abs(float(y.mean()) - 1.0) < 0.01
    x.requires_grad_()
    d(x).sum().backward()
    assert set(torch.unique(x.grad).tolist()) == {0.0, 1.25}
    d.eval()
    assert torch.equal(d(x), x)
    assert torch.equal(Dropout(1.0)(torch.ones(5)), torch.zeros(5))


def test_whole_image_model_and_variants_train(tmp_path):
    ds, feats, _ = make_synthetic(tmp_path, n_train=40, n_val=10, n_test=10)
    for extra in ({"model": "whole-image"}, {"rnn": "gru", "score": "sum-max", "loss": "sum"},
                  {"rnn": "lstm", "score": "sum-all", "norm": False}):
        res = train(*configs(**{**SMALL, "epochs": 1, **extra}), ds, feats, tmp_path / "m.pt", info=lambda *a: None)
        assert np.isfinite(res["best"]["rsum"])
    al = load_aligner(tmp_path / "m.pt")
    assert al.cfg.rnn == "lstm"


def test_gru_global_branch_trains_and_keeps_word_region_scores(tmp_path):
    ds, feats, objs = make_synthetic(tmp_path, n_train=80, n_val=30, n_test=30)
    from vsa.features.store import load_features
    from vsa.retrieval import retrieval_metrics, score_matrix
    from vsa.splits import retrieval_split

    res = train(*configs(**{**SMALL, "global_encoder": "gru"}), ds, feats, tmp_path / "g.pt", info=lambda *a: None)
    assert res["best"]["i2t"]["r1"] >= 60
    al = load_aligner(tmp_path / "g.pt")
    st = load_features(feats)
    rec, o = ds.images[-1], objs[-1]
    m = al.word_region_scores(st[rec.key], ["a", WORDS[o[0]], "and", "a", WORDS[o[1]]])
    assert m.shape == (5, 4)  # the region channels only, not the global branch's
    assert al.image_vectors(st[rec.key]).shape == (4, 32) and al.image_vectors(st[rec.key], full=True).shape == (4, 64)
    # the global branch counts in the score: switching it off changes the scores
    data = retrieval_split(ds, "val", st, al.vocab, al.cfg.max_regions, al.cfg.max_len)
    with_g = score_matrix(al.model, data.feats, data.rmask, data.ids, data.lengths)
    al.cfg.global_weight = 0.0
    without = score_matrix(al.model, data.feats, data.rmask, data.ids, data.lengths)
    assert not np.allclose(with_g, without)
    assert retrieval_metrics(with_g, data.sent_image.numpy())["rsum"] > 0
    # `vsa search text` reads the index's region channels apart from the branch's: the same scores as `vsa eval`
    from vsa.search import Index, build_index, save_index, search_text

    al.cfg.global_weight = 1.0
    save_index(tmp_path / "idx.npz", al, build_index(al, None, store=st, dataset=ds, split="val"))
    idx = Index(tmp_path / "idx.npz")
    V, _, G = idx.flat(al.model.region_dim)
    assert V.shape[1] == 32 and G.shape == (len(idx), 32)
    q = ds.split("val")[0].sentences[0]
    hits = search_text(al, idx, q.raw, 5, hubness=False)
    col = with_g[:, 0]  # the first val sentence against every val photo, in the same order
    assert [h["key"] for h in hits] == [idx.store.keys[i] for i in np.argsort(-col, kind="stable")[:5]]
    assert np.allclose([h["score"] for h in hits], np.sort(col)[::-1][:5], atol=1e-3)
    # the file keeps the branch's image vector once per photo, not in extra channels of every region row
    assert idx.store.emb.shape[1] == 32 and idx.store.emb_global.shape == (len(idx), 32)
    # an index written before `emb_global` (the branch's channels on every row, zeros below row 0) ranks the same
    from vsa.features.store import save_features

    off = idx.emb_offsets
    old = [np.concatenate([idx.store.emb[a:b], np.zeros((b - a, 32), np.float32)], 1) for a, b in zip(off[:-1], off[1:])]
    for i, e in enumerate(old):
        e[0, 32:] = idx.store.emb_global[i]
    save_features(tmp_path / "old.npz", [idx.store.image(i) for i in range(len(idx))], "float16", idx.meta, emb=old,
                  paths=idx.paths, hub=idx.store.hub)
    old_idx = Index(tmp_path / "old.npz")
    assert old_idx.store.emb_global is None and old_idx.store.emb.shape[1] == 64
    assert search_text(al, old_idx, q.raw, 5, hubness=False) == hits


@pytest.mark.parametrize("enc", ["mean", "gru"])
def test_branch_loss_adds_the_ranking_loss_of_each_score_term_alone(enc):
    from vsa.alignment.model import AlignModelConfig, BRNNAligner
    from vsa.alignment.train import AlignTrainConfig, _loss

    torch.manual_seed(0)
    m = BRNNAligner(AlignModelConfig(hidden=8, embed=4, global_weight=0.5, global_encoder=enc), 12, 6).eval()
    feats, rmask = torch.randn(3, 4, 6), torch.ones(3, 4, dtype=torch.bool)
    rmask[2, 3] = False
    ids, lengths = torch.randint(1, 12, (6, 5)), torch.tensor([5, 3, 4, 2, 5, 1])
    img_of = torch.tensor([0, 0, 1, 1, 2, 2])
    V, vm = m.embed_images(feats, rmask)
    S, sm = m.embed_sentences(ids, lengths)
    local, glob = m.score_parts(V, vm, S, sm)
    assert torch.allclose(m.score(V, vm, S, sm), local + 0.5 * glob)
    assert not torch.allclose(local, glob)
    for hardest in (False, True):
        one = ranking_loss(local + 0.5 * glob, img_of, 0.2, hardest)
        assert torch.equal(_loss(m, AlignTrainConfig(branch_loss=0.0), V, vm, S, sm, img_of, hardest), one)
        both = _loss(m, AlignTrainConfig(branch_loss=0.5), V, vm, S, sm, img_of, hardest)
        parts = ranking_loss(local, img_of, 0.2, hardest) + ranking_loss(glob, img_of, 0.2, hardest)
        assert float(parts) > 0 and torch.allclose(both, one + 0.5 * parts)
    m.cfg.global_weight = 0.0  # no global term: nothing to add
    assert m.score_parts(V, vm, S, sm)[1] is None
    assert torch.equal(_loss(m, AlignTrainConfig(branch_loss=1.0), V, vm, S, sm, img_of, True),
                       ranking_loss(m.score(V, vm, S, sm), img_of, 0.2, True))


def test_overrides_are_typed_and_checked():
    from vsa.errors import VsaError

    m, t = parse_overrides(configs(), ["dropout=0.3", "norm=false", "epochs=3"])
    assert m.dropout == 0.3 and m.norm is False and t.epochs == 3  # model and training fields, one --set
    for bad in (["nope=1"], ["epochs=x"], ["score=best"], ["dropout"], ["loss=least"]):
        with pytest.raises(VsaError):
            parse_overrides(configs(), bad)


@pytest.mark.parametrize("fields", [dict(score="mean-max", global_encoder="mean"),
                                    dict(score="sum-max", global_weight=0.0), dict(score="sum-all", global_encoder="mean"),
                                    dict(score="global", global_encoder="mean"),
                                    dict(score="global", global_encoder="gru"),
                                    dict(global_encoder="gru"),
                                    dict(score="scan", scan_lambda=4.0, global_encoder="mean"),
                                    dict(model="whole-image")])
def test_flat_score_of_a_search_index_equals_the_padded_score(fields):
    """`vsa search` scores unpadded region vectors (`flat_score`); it must equal the padded `score` training uses."""
    from vsa.alignment.model import AlignModelConfig, build_model
    from vsa.features.store import pad_regions

    torch.manual_seed(0)
    model = build_model(AlignModelConfig(**fields, hidden=16, embed=8), vocab_size=20, feat_dim=12).eval()
    rng = np.random.RandomState(0)
    feats = [rng.randn(n, 12).astype(np.float32) for n in (3, 1, 5, 2)]
    ids = torch.tensor([[4, 5, 6, 0], [7, 8, 9, 10]])
    lengths = torch.tensor([3, 4])
    with torch.inference_mode():
        F, fm = pad_regions(feats)
        V, vm = model.embed_images(F, fm)
        S, sm = model.embed_sentences(ids, lengths)
        padded = model.score(V, vm, S, sm)
        flat = V[vm]
        reg_img = vm.nonzero(as_tuple=True)[0]
        got = model.flat_score(flat, reg_img, len(feats), S, sm)
        if fields.get("global_encoder") == "gru":  # a search index's split: region channels apart from the branch's
            h = model.region_dim
            first = torch.tensor([0, 3, 4, 9])
            split = model.flat_score(flat[:, :h].contiguous(), reg_img, len(feats), S, sm, flat[first, h:])
            assert flat.shape[1] == 2 * h and torch.allclose(split, padded, atol=1e-6)
    assert torch.allclose(got, padded, atol=1e-6)
    # and both are the formulas, pair by pair
    cfg = model.cfg
    h = model.region_dim
    for i, f in enumerate(feats):
        for j, t in enumerate(lengths.tolist()):
            v, w = V[i, : len(f) if cfg.model == "brnn" else 1], S[j, :t]
            if cfg.model == "whole-image":
                ref = float(v[0] @ S[j, 0])
            else:
                d = v[:, :h] @ w[:, :h].T  # [R, T]
                alpha = torch.softmax(cfg.scan_lambda * d, 0)  # [R, T]: each word over the regions
                att = alpha.T @ v[:, :h]  # [T, h]
                scan = ((att * w[:, :h]).sum(1) / att.norm(dim=1)).mean()
                ref = {"sum-max": d.amax(0).sum(), "mean-max": d.amax(0).mean(), "sum-all": d.clamp(min=0).sum(),
                       "scan": scan,
                       "global": torch.nn.functional.normalize(v[0, :h], dim=0)
                       @ torch.nn.functional.normalize(w[:, :h].mean(0), dim=0)}[cfg.score]
                if cfg.global_weight and cfg.global_encoder == "gru":
                    ref = ref + cfg.global_weight * (v[0, h:] @ S[j, 0, h:])
                elif cfg.global_weight and cfg.score != "global":
                    ref = ref + cfg.global_weight * (torch.nn.functional.normalize(v[0, :h], dim=0)
                                                     @ torch.nn.functional.normalize(w[:, :h].mean(0), dim=0))
                ref = float(ref)
            assert got[i, j].item() == pytest.approx(ref, abs=1e-5), (fields, i, j)


def test_glove_initialises_words_and_aliases_unknown_ones(tmp_path):
    """`--glove FILE.txt`: known words start from their GloVe vector (projected to `embed`); the checkpoint keeps,
    for GloVe words outside the vocabulary, their nearest known word, which the aligner reads them as."""
    from vsa.alignment.model import load_aligner
    from vsa.checkpoint import load_checkpoint
    from vsa.alignment.glove import glove_aliases

    rng = np.random.default_rng(0)
    base = {w: rng.normal(size=8) for w in WORDS}
    vecs = dict(base)
    vecs["kitten"] = base["cat"] + 0.1 * rng.normal(size=8)  # close to "cat"
    vecs["puppy"] = base["dog"] + 0.1 * rng.normal(size=8)
    vecs["zzz"] = -sum(base.values())  # far from every word: no alias
    vecs["Tabby"] = base["cat"]  # not lower-case: skipped
    glove = tmp_path / "glove.txt"
    glove.write_text("".join(f"{w} " + " ".join(f"{x:.5f}" for x in v) + "\n" for w, v in vecs.items()))
    vocab = ["<pad>", "<unk>", "<start>", "<end>"] + WORDS
    al = glove_aliases(vocab, str(glove), min_sim=0.8)
    assert al.get("kitten") == "cat" and al.get("puppy") == "dog"
    assert "zzz" not in al and "Tabby" not in al and not set(al) & set(WORDS)

    ds, feats, _ = make_synthetic(tmp_path, n_train=40, n_val=10, n_test=10)
    out = tmp_path / "g.pt"
    train(*configs(**{**SMALL, "epochs": 1}, glove=str(glove)), ds, feats, out, info=lambda *a: None)
    assert load_checkpoint(out)["meta"]["aliases"]["kitten"] == "cat"
    a = load_aligner(out)
    assert a.read_as(["a", "kitten", "dog"]) == {"kitten": "cat"}
    assert torch.equal(a.encode_tokens([["kitten", "dog"]])[0], a.encode_tokens([["cat", "dog"]])[0])
    assert not torch.equal(a.encode_tokens([["zzz"]])[0], a.encode_tokens([["cat"]])[0])  # still unknown
    # the initial word vectors are GloVe's through a fixed projection (checked on a fresh table)
    from vsa.data import Vocab
    from vsa.alignment.glove import init_glove

    table = torch.nn.Embedding(len(vocab), 16)
    assert init_glove(table, Vocab(vocab), str(glove)) == len(WORDS)
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(8, 16, generator=g) / np.sqrt(8)
    i = Vocab(vocab).stoi["cat"]
    assert torch.allclose(table.weight[i], torch.tensor(vecs["cat"], dtype=torch.float32) @ proj, atol=1e-4)


def test_image_cells_are_read_beyond_max_regions_and_recorded(tmp_path):
    """Features with `cells` (vsa embed --cells): the model reads max_regions rows plus the cells (a cap of
    max_regions alone would cut them off silently), records `cells` in its config; more boxes than it reads
    (which would push the cells out) and resuming on features with other cells are refused."""
    from vsa.alignment.model import region_rows
    from vsa.errors import VsaError
    from vsa.features.store import load_features, save_features

    ds, feats, _ = make_synthetic(tmp_path, n_train=40, n_val=10, n_test=10)
    st = load_features(feats, mmap=False)
    rows = []
    for i in range(len(st.keys)):
        rec = st.image(i)
        rec["feats"] = np.concatenate([np.asarray(rec["feats"], np.float32), np.zeros((4, st.dim), np.float32)])
        rec["regions"] = rec["regions"] + [{"box": [0, 0, 1, 1], "score": 1.0, "label": "cell"}] * 4
        rows.append(rec)
    save_features(tmp_path / "cells.npz", rows, "float16", {**st.meta, "cells": 2})
    msgs = []
    kw = {**SMALL, "epochs": 1, "max_regions": 4}
    with pytest.raises(VsaError, match="4 regions besides its 2 x 2 cells but the model reads 3"):
        train(*configs(**{**kw, "max_regions": 3}), ds, tmp_path / "cells.npz", tmp_path / "c.pt", info=msgs.append)
    train(*configs(**kw), ds, tmp_path / "cells.npz", tmp_path / "c.pt", info=msgs.append)
    assert "up to 8 regions" in msgs[0]  # the whole image and 3 boxes, then the 2 x 2 cells
    al = load_aligner(tmp_path / "c.pt")
    assert al.cfg.cells == 2 and region_rows(al.cfg) == 8
    from vsa.alignment.evaluate import _model_scores

    S, *_ = _model_scores(tmp_path / "c.pt", ds, "test", tmp_path / "cells.npz", device="cpu")
    assert S.shape == (10, 50)
    with pytest.raises(VsaError, match="trained on features with 2 x 2 image cells"):
        _model_scores(tmp_path / "c.pt", ds, "test", feats, device="cpu")
    with pytest.raises(VsaError, match="cells"):
        train(*configs(**{**kw, "epochs": 2}), ds, feats, tmp_path / "c.pt", resume=True, epochs=2, info=msgs.append)


def test_mirrored_features_are_read_by_training_images_with_probability_flip(tmp_path):
    from tests.synth_align import mirrored_copy
    from vsa.checkpoint import load_checkpoint
    from vsa.features.store import RegionBank, load_features
    from vsa.splits import retrieval_split
    from vsa.alignment.train import epoch_flips, image_feats
    from vsa.data import build_vocab

    ds, feats, _ = make_synthetic(tmp_path, n_train=80, n_val=30, n_test=10)
    flipped = mirrored_copy(feats, tmp_path / "flip.npz")  # the "mirrored" vectors are the originals negated
    store = load_features(feats)
    data = retrieval_split(ds, "train", store, build_vocab(ds, 1), 4, 40)
    assert epoch_flips(data, 0.5, 0) is None  # no mirrored features: nothing drawn, old runs unchanged
    data.flipped = RegionBank(load_features(flipped), data.keys, 4)
    img = torch.tensor([0, 3, 5])
    assert torch.equal(image_feats(data, img, torch.ones(len(data.keys), dtype=torch.bool)), -data.feats[img])
    half = torch.arange(len(data.keys)) % 2 == 0
    f = image_feats(data, img, half)
    assert torch.equal(f[0], -data.feats[img[:1]][0]) and torch.equal(f[1], data.feats[img[1:2]][0])
    assert epoch_flips(data, 0.0, 0) is None
    share = float(epoch_flips(data, 0.3, 1).float().mean())
    assert 0.15 < share < 0.45 and not torch.equal(epoch_flips(data, 0.3, 1), epoch_flips(data, 0.3, 2))
    # training: the checkpoint records the file and the chance; with flip=1 every training image reads the negated
    # vectors, so the model never sees the val images' kind of features and retrieval falls to about chance
    kw = {**SMALL, "epochs": 3}
    plain = train(*configs(**kw), ds, feats, tmp_path / "a.pt", info=lambda *a: None)
    always = train(*configs(**kw, flip=1.0), ds, feats, tmp_path / "b.pt", info=lambda *a: None, flip_features=flipped)
    assert plain["best"]["i2t"]["r1"] >= 50 and always["best"]["i2t"]["r1"] < 25
    ck = load_checkpoint(tmp_path / "b.pt")
    assert ck["train"]["flip"] == 1.0 and ck["meta"]["flip_features"] == str(flipped.resolve())
    half = train(*configs(**kw, flip=0.5), ds, feats, tmp_path / "c.pt", info=lambda *a: None, flip_features=flipped)
    assert half["best"]["rsum"] != plain["best"]["rsum"]
    # refused: not mirrored, made differently, images missing
    for bad, msg in ((mirrored_copy(feats, tmp_path / "b1.npz", meta={}), "not mirrored"),
                     (mirrored_copy(feats, tmp_path / "b2.npz", meta={"flip": True, "input": 260}),
                      "made differently .*input"),
                     (mirrored_copy(feats, tmp_path / "b3.npz", drop=1), "have no mirrored features")):
        with pytest.raises(Exception, match=msg):
            train(*configs(**kw), ds, feats, tmp_path / "x.pt", info=lambda *a: None, flip_features=bad)
    with pytest.raises(Exception, match="flip must be"):
        parse_overrides(configs(), ["flip=2"])


@pytest.mark.parametrize("group", [2, 5, 150])
def test_epoch_order_keeps_each_chunk_together_however_many_sentences_an_image_has(group):
    """An image with more than 100 x group sentences (a caption corpus of many captions per photo) gets chunks of
    its own, never shared with the next image's, and every chunk's sentences sit side by side."""
    from vsa.alignment.train import epoch_order

    counts = [450, 3, 1, 260, 7]
    sent_image = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    order = epoch_order(sent_image, group, seed=3)
    assert sorted(order.tolist()) == list(range(len(sent_image)))
    # the image's sentences come in blocks of whole chunks: full ones of `group`, and one of n % group
    imgs = sent_image[order].tolist()
    i = 0
    while i < len(imgs):
        j = i
        while j < len(imgs) and imgs[j] == imgs[i]:
            j += 1
        assert (j - i) % group in (0, counts[imgs[i]] % group), (imgs[i], j - i)
        i = j
