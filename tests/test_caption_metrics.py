"""Metric wrappers against hand-made references."""

from __future__ import annotations

import shutil

import pytest

from vsa.generator.metrics import CiderD, score_captions

GTS = {
    1: ["a dog runs on the grass", "a brown dog is running in a field", "the dog plays outside"],
    2: ["two people sit on a bench", "a man and a woman on a park bench", "people sitting outside"],
    3: ["a child swims in the pool", "a kid is swimming", "a young girl in the water"],
}


def test_bleu_by_hand():
    # candidate "a dog a dog" vs "a dog runs": clipped unigrams 2/4, bigrams "a dog" x1 of 3 -> 1/3
    s = score_captions({0: ["a dog runs"]}, {0: "a dog a dog"}, metrics=("BLEU",), tokenizer="simple")
    assert s["BLEU-1"] == pytest.approx(50.0, abs=0.01)
    assert s["BLEU-2"] == pytest.approx(100 * (0.5 * 1 / 3) ** 0.5, abs=0.01)


def test_perfect_and_disjoint_captions():
    perfect = {k: v[0] for k, v in GTS.items()}
    s = score_captions(GTS, perfect, metrics=("BLEU", "ROUGE-L", "CIDEr"), tokenizer="simple")
    assert s["BLEU-1"] == pytest.approx(100.0, abs=0.01) and s["BLEU-4"] == pytest.approx(100.0, abs=0.1)
    assert s["ROUGE-L"] > 60
    bad = {k: "zebra umbrella" for k in GTS}
    z = score_captions(GTS, bad, metrics=("BLEU", "ROUGE-L", "CIDEr"), tokenizer="simple")
    assert z["BLEU-1"] < 1 and z["CIDEr"] == 0 and z["ROUGE-L"] == 0
    assert s["CIDEr"] > 100


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need Java")
def test_ptb_tokenizer_and_meteor():
    res = {1: "A dog runs on the grass.", 2: "Two people sit on a bench!", 3: "zebra"}
    s = score_captions(GTS, res, tokenizer="ptb")
    assert set(s) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    # punctuation and case are removed by PTB, so 2 of 3 captions equal a reference
    one = score_captions({1: GTS[1]}, {1: "A dog runs on the grass."}, metrics=("BLEU", "METEOR"), tokenizer="ptb")
    assert one["BLEU-4"] == pytest.approx(100.0, abs=0.1)
    assert one["METEOR"] > 90
    assert 0 < s["METEOR"] < one["METEOR"]


def test_cider_d_matches_pycocoevalcap_when_idf_is_the_same_corpus():
    from pycocoevalcap.cider.cider import Cider

    res = {1: "a dog runs in the grass", 2: "a man sits on a bench", 3: "a kid swimming in a pool"}
    refs = [[r.split() for r in GTS[k]] for k in GTS]
    ours = CiderD(refs).score([res[k].split() for k in GTS], refs)
    _, theirs = Cider().compute_score(GTS, {k: [v] for k, v in res.items()})
    assert ours == pytest.approx(list(theirs), abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_reward_is_cider_d_plus_weighted_per_sentence_meteor():
    from vsa.generator.metrics import MeteorSegments, MixedReward

    end = "</s>"
    corpus = [[r.split() + [end] for r in GTS[k]] for k in GTS]
    refs = corpus[0]
    cands = [["a", "dog", "runs", end], "a brown dog is running on the grass".split() + [end], []]
    cider = CiderD(corpus)
    mixed = MixedReward(cider, 2.0, end)
    got = mixed.score(cands, [refs] * 3)
    c = cider.score(cands, [refs] * 3)
    m = MeteorSegments().score([x[:-1] for x in cands[:2]] + [[]], [[r[:-1] for r in refs]] * 3)
    assert got == pytest.approx([a + 2.0 * b for a, b in zip(c, m)], abs=1e-9)
    assert m[1] > m[0] > 0 and m[2] == 0.0  # recall: the longer matching sentence earns more; empty earns 0
    # per sentence it is the evaluation's METEOR (one segment's corpus score), the end token unseen
    one = score_captions({0: GTS[1]}, {0: "a dog runs"}, metrics=("METEOR",), tokenizer="simple")
    assert one["METEOR"] == pytest.approx(100 * m[0], abs=0.01)


def test_a_meteor_java_process_that_dies_is_a_one_line_error_not_a_hang(monkeypatch):
    """pycocoevalcap's Meteor keeps its lock when a read from a dead Java process fails, and its __del__ then waits on
    that lock forever: `vsa eval` hung after its Java child was killed. Now the failure is a VsaError."""
    import threading

    import pycocoevalcap.meteor.meteor as M

    from vsa.generator.metrics import MeteorSegments
    from vsa.errors import VsaError

    if shutil.which("java") is None:
        pytest.skip("no java")
    real = M.Meteor.__init__

    def dying(self):  # the Java process dies (killed, out of memory) right after it started
        real(self)
        self.meteor_p.kill()
        self.meteor_p.wait()

    monkeypatch.setattr(M.Meteor, "__init__", dying)
    outcome = {}

    def run():
        try:
            score_captions({1: GTS[1]}, {1: "a dog runs"}, metrics=("METEOR",))
        except VsaError as e:
            outcome["caption"] = str(e)
        try:
            MeteorSegments().score([["a", "dog"]], [[["a", "dog", "runs"]]])
        except VsaError as e:
            outcome["reward"] = str(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "METEOR hung on a dead Java process"
    for k in ("caption", "reward"):
        assert "Java process stopped" in outcome[k] and "\n" not in outcome[k], outcome
