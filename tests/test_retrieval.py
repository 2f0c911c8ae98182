"""R@K and median rank against hand-computed cases (the paper's protocol, both directions)."""

from __future__ import annotations

import numpy as np
import pytest

from vsa.retrieval import i2t_ranks, retrieval_metrics, summarize, t2i_ranks, top_k

# 2 images x 4 sentences; sentences 0, 1 belong to image 0 and 2, 3 to image 1
SCORES = np.array([
    [0.1, 0.9, 0.5, 0.3],   # image 0: its best true sentence (1, 0.9) is first -> rank 1
    [0.8, 0.2, 0.1, 0.7],   # image 1: true sentences 2 (0.1), 3 (0.7); 0.8 beats 0.7 -> rank 2
])
OWNER = np.array([0, 0, 1, 1])


def test_i2t_ranks_hand_computed():
    assert i2t_ranks(SCORES, OWNER).tolist() == [1, 2]


def test_t2i_ranks_hand_computed():
    # sentence 0: image 1 (0.8) beats image 0 (0.1) -> 2; sentence 1: 0.9 > 0.2 -> 1
    # sentence 2: image 0 (0.5) beats image 1 (0.1) -> 2; sentence 3: 0.7 > 0.3 -> 1
    assert t2i_ranks(SCORES, OWNER).tolist() == [2, 1, 2, 1]


def test_summarize_recall_and_median():
    s = summarize(np.array([1, 2, 3, 10, 11]))
    assert s["r1"] == 20.0 and s["r5"] == 60.0 and s["r10"] == 80.0
    assert s["medr"] == 3 and isinstance(s["medr"], int)
    assert s["meanr"] == 5.4


def test_median_of_even_count_is_the_mean_of_the_middle_two():
    assert summarize(np.array([1, 2, 3, 4]))["medr"] == 2.5
    assert summarize(np.array([1, 2, 4, 100]))["medr"] == 3


def test_a_wrong_item_tied_with_the_true_one_ranks_ahead_of_it():
    s = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert i2t_ranks(s, np.array([0, 1])).tolist() == [2, 2]
    assert t2i_ranks(s, np.array([0, 1])).tolist() == [2, 2]
    # image 0's two true sentences tie with each other and one wrong sentence: only the wrong one counts
    s = np.array([[0.7, 0.7, 0.7, 0.1], [0.0, 0.0, 0.9, 0.9]])
    assert i2t_ranks(s, np.array([0, 0, 1, 1])).tolist() == [2, 1]


def test_constant_scores_rank_every_true_item_last():
    n = 20
    owner = np.repeat(np.arange(n), 5)
    m = retrieval_metrics(np.zeros((n, 5 * n)), owner)
    assert m["rsum"] == 0 and m["t2i"]["medr"] == n and m["i2t"]["medr"] == 5 * n - 5 + 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_an_error_not_a_rank(bad):
    from vsa.errors import VsaError
    from vsa.retrieval import NonFiniteScores, check_finite_scores

    s = SCORES.copy()
    s[1, 2] = bad
    for f in (i2t_ranks, t2i_ranks, retrieval_metrics):
        with pytest.raises(NonFiniteScores, match="1 of 8 scores are NaN or infinite"):
            f(s, OWNER)
    with pytest.raises(VsaError, match="^m.pt: the aligner's scores: 8 of 8"):
        check_finite_scores(np.full((2, 4), bad), "the aligner's scores", "m.pt")


def test_check_finite_features_names_the_file_and_the_first_bad_item():
    import torch

    from vsa.errors import VsaError
    from vsa.retrieval import check_finite_features

    x = np.zeros((600, 3, 2), np.float32)
    check_finite_features(x, [f"k{i}" for i in range(600)], "f.npz")
    x[517, 2, 1] = np.nan
    x[590, 0, 0] = np.inf
    for feats in (x, torch.from_numpy(x)):
        with pytest.raises(VsaError, match="^f.npz: the features of 'k517' hold NaN or infinite values$"):
            check_finite_features(feats, [f"k{i}" for i in range(600)], "f.npz")


def test_retrieval_metrics_rsum():
    m = retrieval_metrics(SCORES, OWNER)
    assert m["i2t"]["r1"] == 50.0 and m["i2t"]["r5"] == 100.0
    assert m["t2i"]["r1"] == 50.0 and m["t2i"]["medr"] == 1.5
    assert m["rsum"] == 50 + 100 + 100 + 50 + 100 + 100


def test_perfect_and_reversed_scores():
    n = 20
    owner = np.repeat(np.arange(n), 5)
    perfect = (owner[None, :] == np.arange(n)[:, None]).astype(float)
    m = retrieval_metrics(perfect, owner)
    assert m["i2t"]["r1"] == 100 and m["t2i"]["r1"] == 100 and m["i2t"]["medr"] == 1
    m = retrieval_metrics(-perfect, owner)
    assert m["i2t"]["r1"] == 0 and m["t2i"]["medr"] == n  # the true image is always last


def test_image_without_sentence_is_an_error():
    with pytest.raises(ValueError):
        i2t_ranks(np.zeros((2, 2)), np.array([0, 0]))


def test_top_k_best_first_both_axes():
    s = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    assert top_k(s, 2).tolist() == [[1, 2], [2, 0]]
    assert top_k(s, 1, axis=0).tolist() == [[1], [0], [1]]
    assert top_k(s, 10).shape == (2, 3)


def test_hubness_correction_demotes_an_image_that_scores_high_with_everything():
    from vsa.retrieval import bank_means, debias

    owner = np.repeat(np.arange(4), 2)
    S = np.where(owner[None, :] == np.arange(4)[:, None], 1.0, 0.0)
    S[3] = np.where(owner == 3, 1.5, 1.2)  # image 3: a hub, above every other image for every sentence
    assert t2i_ranks(S, owner).tolist() == [2, 2, 2, 2, 2, 2, 1, 1]
    rng = np.random.default_rng(0)
    B1 = rng.uniform(0.0, 0.4, size=(4, 10))  # the eval images against 10 bank sentences
    B1[3] = 1.2  # the hub scores high with the bank's sentences too
    B2 = rng.uniform(0.0, 0.4, size=(5, 8))  # 5 bank images against the eval sentences
    img_hub, sent_hub = bank_means(B1, 3, 1), bank_means(B2, 3, 0)
    assert img_hub[3] == pytest.approx(1.2) and (img_hub[:3] < 0.4).all() and sent_hub.shape == (8,)
    fixed = debias(S, img_hub, sent_hub, 1.0)
    assert (t2i_ranks(fixed, owner) == 1).all() and (i2t_ranks(fixed, owner) == 1).all()
    # one matrix serves both directions: within a row the image's term is a constant, within a column the sentence's
    assert (i2t_ranks(fixed, owner) == i2t_ranks(S - sent_hub[None, :], owner)).all()
    assert (t2i_ranks(fixed, owner) == t2i_ranks(S - img_hub[:, None], owner)).all()
    assert (debias(S, img_hub, sent_hub, 0.0) == S.astype(np.float32)).all()
