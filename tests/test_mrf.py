"""Chain MRF snippet alignment: exact DP against brute force, limits in beta, snippet records."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsa.alignment.mrf import alignment_record, align_sentence, energy, snippet_stats, snippets, viterbi


def brute_force(U: np.ndarray, beta: float) -> float:
    N, M = U.shape
    return max(energy(U, a, beta) for a in itertools.product(range(M), repeat=N))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.floats(0.0, 3.0), st.integers(0, 2**31 - 1))
def test_viterbi_equals_brute_force(n, m, beta, seed):
    U = np.random.default_rng(seed).normal(size=(n, m))
    a, e = viterbi(U, beta)
    assert a.shape == (n,) and a.min() >= 0 and a.max() < m
    assert e == pytest.approx(energy(U, a, beta), abs=1e-9)  # reported energy is the assignment's
    assert e == pytest.approx(brute_force(U, beta), abs=1e-9)  # and it is the optimum


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_beta_zero_is_per_word_argmax(n, m, seed):
    U = np.random.default_rng(seed).normal(size=(n, m))
    a, _ = viterbi(U, 0.0)
    np.testing.assert_array_equal(a, U.argmax(1))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 15), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_huge_beta_gives_one_snippet(n, m, seed):
    U = np.random.default_rng(seed).normal(size=(n, m))
    sn = align_sentence(U, beta=1e6)
    assert len(sn) == 1 and (sn[0].start, sn[0].end) == (0, n)
    assert sn[0].region == int(U.sum(0).argmax())  # the single region is the best for the whole sentence


def test_snippet_length_grows_with_beta():
    rng = np.random.default_rng(0)
    Us = [rng.normal(size=(10, 20)) for _ in range(50)]
    means = []
    for beta in (0.0, 0.5, 1.0, 2.0, 5.0):
        lens = [s.end - s.start for U in Us for s in align_sentence(U, beta)]
        means.append(np.mean(lens))
    assert all(b >= a for a, b in zip(means, means[1:]))
    assert means[0] < 1.2 and means[-1] > 5


def test_snippets_cover_sentence_and_score_is_mean():
    U = np.array([[1.0, 0.0], [0.8, 0.1], [0.0, 2.0], [0.1, 1.0]])
    a, _ = viterbi(U, 0.0)
    sn = snippets(U, a)
    assert [(s.start, s.end, s.region) for s in sn] == [(0, 2, 0), (2, 4, 1)]
    assert sn[0].score == pytest.approx(0.9) and sn[1].score == pytest.approx(1.5)


def test_pairwise_term_merges_a_weak_word():
    # word 1 slightly prefers region 1, but both neighbours are on region 0: beta 0.5 pulls it over
    U = np.array([[2.0, 0.0], [0.0, 0.3], [2.0, 0.0]])
    assert list(viterbi(U, 0.0)[0]) == [0, 1, 0]
    assert list(viterbi(U, 0.5)[0]) == [0, 0, 0]


def test_alignment_record_matches_format():
    tokens = ["a", "child", "in", "a", "pink", "dress"]
    U = np.zeros((6, 3))
    U[:2, 2] = 3.0
    U[2:, 0] = 1.0
    boxes = np.array([[0, 0, 224, 224], [10, 10, 50, 50], [61.24, 20.5, 150, 220.3]], dtype=np.float32)
    rec = alignment_record("k.jpg", 7, "train", tokens, U, 1.0, boxes, ["image", "dog", "person"])
    assert rec["key"] == "k.jpg" and rec["sentid"] == 7 and rec["beta"] == 1.0
    s0, s1 = rec["snippets"]
    assert s0 == {"start": 0, "end": 2, "text": "a child", "region": 2, "box": [61.2, 20.5, 150.0, 220.3],
                  "label": "person", "score": 3.0}
    assert (s1["text"], s1["region"], s1["label"]) == ("in a pink dress", 0, "image")
    st_ = snippet_stats([rec])
    assert st_["snippets"] == 2 and st_["mean_length"] == 3.0 and st_["whole_image_share"] == 0.5


def test_empty_and_bad_input():
    a, e = viterbi(np.zeros((0, 3)), 1.0)
    assert len(a) == 0 and e == 0.0
    with pytest.raises(ValueError):
        viterbi(np.zeros((3, 0)), 1.0)
    with pytest.raises(ValueError):
        viterbi(np.zeros(3), 1.0)


def test_label_agreement_counts_snippets_naming_their_box():
    from benchmarks.analysis import label_agreement

    recs = [{"snippets": [{"start": 0, "end": 3, "text": "a black dog", "region": 2, "label": "dog"},
                          {"start": 3, "end": 4, "text": "jumps", "region": 0, "label": "image"},
                          {"start": 4, "end": 7, "text": "over the man", "region": 3, "label": "dog"},
                          {"start": 7, "end": 10, "text": "in a red", "region": 4, "label": "toaster"}]},
            {"snippets": [{"start": 0, "end": 1, "text": "dog", "region": 1, "label": "dog"}]}]
    a = label_agreement(recs)
    assert a["object_snippets_with_known_label"] == 3 and a["agree"] == 2 / 3
    # phrase-length (2..6 words) object snippets: "a black dog" (names its box) and "over the man" (does not)
    assert a["phrase_precision"] == 0.5 and a["good_phrases_per_sentence"] == 0.5
    assert a["person_dog_snippets"] == 3 and a["person_dog_on_matching_box"] == 2 / 3


def test_noun_grounding_counts_class_words_on_boxes_of_their_class():
    from benchmarks.analysis import noun_grounding

    labels = {"a.jpg": ["image", "dog", "person"], "b.jpg": ["image", "car"]}
    recs = [
        # "dog" on the dog box (hit), "man" on the whole image (miss)
        {"key": "a.jpg", "tokens": ["a", "dog", "and", "a", "man"],
         "snippets": [{"start": 0, "end": 2, "region": 1, "label": "dog"},
                      {"start": 2, "end": 5, "region": 0, "label": "image"}]},
        # "dog" in an image without a dog box: not counted; "car" on the car box: hit
        {"key": "b.jpg", "tokens": ["a", "dog", "near", "a", "car"],
         "snippets": [{"start": 0, "end": 3, "region": 0, "label": "image"},
                      {"start": 3, "end": 5, "region": 1, "label": "car"}]},
    ]
    g = noun_grounding(recs, labels.__getitem__)
    assert (g["words"], g["grounded"]) == (3, 2) and abs(g["share"] - 2 / 3) < 1e-9
    assert g["per_class"] == {"dog": [1, 1], "person": [0, 1], "car": [1, 1]}


def test_image_cells_score_but_are_never_grounded():
    """Regions labelled `cell` (`vsa embed --cells`) are context for the score: the MRF skips them even where
    a word's best score is on a cell; with nothing but cells they are used (never an empty choice)."""
    from vsa.alignment.mrf import grounding_mask

    tokens = ["a", "dog", "on", "grass"]
    U = np.zeros((4, 4))
    U[:, 3] = 5.0  # a cell beats every box for every word
    U[:, 0] = 1.0  # the whole image next, but for
    U[1, 1] = 2.0  # "dog": its box
    boxes = np.array([[0, 0, 9, 9], [1, 1, 4, 4], [2, 2, 6, 6], [0, 0, 3, 3]], dtype=np.float32)
    labels = ["image", "dog", "person", "cell"]
    rec = alignment_record("k", 0, "val", tokens, U, 0.0, boxes, labels)
    assert [s["label"] for s in rec["snippets"]] == ["image", "dog", "image"]
    assert all(s["region"] != 3 for s in rec["snippets"])
    # without labels (or with a different label) the cell wins: the mask is what keeps it out
    assert alignment_record("k", 0, "val", tokens, U, 0.0, boxes, ["image", "dog", "person", "x"])["snippets"][0]["region"] == 3
    assert grounding_mask(["image", "cell", "dog"]).tolist() == [False, True, False]
    assert grounding_mask(["cell", "cell"]).tolist() == [False, False]
