"""Snippets: the word-region scores vsa align decodes, and the beta sweep of benchmarks/analysis.py."""

from __future__ import annotations

import numpy as np


class AlternatingAligner:
    """Word t's best region is 1 + t % 2 (object boxes), by a small margin over the rest."""

    def word_region_scores(self, feats, tokens):
        U = np.zeros((len(tokens), len(feats)))
        for t in range(len(tokens)):
            U[t, 1 + t % 2] = 0.1
        return U


def _store_and_pairs():
    from vsa.data import ImageRecord, Sentence
    from vsa.features.store import FeatureStore

    keys = ["a.jpg", "b.jpg"]
    arrays = {"feats": np.ones((6, 4), np.float32), "offsets": np.array([0, 3, 6]), "keys": np.array(keys),
              "boxes": np.tile(np.array([[0, 0, 224, 224], [1, 2, 3, 4], [5, 6, 7, 8]], np.float32), (2, 1)),
              "labels": np.array(["image", "dog", "person"] * 2)}
    recs = [ImageRecord(k, "val", i, [Sentence("", "a dog and a man run".split(), i)]) for i, k in enumerate(keys)]
    return FeatureStore(None, arrays=arrays), [(r, s) for r in recs for s in r.sentences]


def test_beta_sweep_decodes_each_pair_with_every_beta_longer_snippets_at_higher_beta():
    from benchmarks.analysis import beta_sweep

    store, pairs = _store_and_pairs()
    out = beta_sweep(AlternatingAligner(), store, pairs, [0.0, 1.0])
    assert set(out) == {0.0, 1.0} and out[0.0]["sentences"] == out[1.0]["sentences"] == 2
    # beta 0: every word on its own best box; a high beta pays for staying on one region
    assert out[0.0]["mean_length"] == 1.0 and out[1.0]["mean_length"] > 1.0
    assert "agree" in out[0.0]  # with the label agreement of each beta's snippets


def test_word_region_scores_of_any_scorer_are_its_own():
    from vsa.alignment.snippets import word_region_scores

    store, pairs = _store_and_pairs()
    U = word_region_scores(AlternatingAligner(), store["a.jpg"], ["a", "dog"], {})
    assert U.shape == (2, 3) and U[0].argmax() == 1 and U[1].argmax() == 2
