"""Caption metrics: pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L, CIDEr, plus a fast CIDEr-D.

:func:`score_captions` wraps the COCO caption evaluation scorers exactly as the COCO
server runs them (PTB tokenizer, Java; METEOR needs Java too).  It never builds the SPICE
scorer nor calls ``COCOEvalCap.evaluate()``: both download Stanford models and fail offline.
Scores are returned on a 0-100 scale, like the paper's tables.

:class:`CiderD` is a small vectorised CIDEr-D with document frequencies fixed on a
reference corpus (the training captions), used as the reward of self-critical training
where the scorer runs thousands of times.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter, defaultdict

ALL = ("BLEU", "METEOR", "ROUGE-L", "CIDEr")
KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def ptb_tokenize(captions: dict) -> dict:
    """``{id: [str, ...]}`` -> the same, PTB-tokenised, lower-cased, punctuation removed (Java)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = {k: [{"caption": c} for c in v] for k, v in captions.items()}
    return PTBTokenizer().tokenize(data)


def simple_tokenize(captions: dict) -> dict:
    """Python stand-in for the PTB tokenizer (the paper's tokenisation), no Java: for per-epoch scores."""
    from vsa.data import tokenize

    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions.items()}


def score_captions(gts: dict, res: dict, metrics=ALL, tokenizer: str = "ptb") -> dict:
    """Corpus scores of generated captions ``res`` (``{id: str}``) against references ``gts`` (``{id: [str]}``).

    ``metrics``: any of ``BLEU``, ``METEOR``, ``ROUGE-L``, ``CIDEr``. ``tokenizer``: ``ptb``
    (the COCO protocol) or ``simple``. Returns ``{"BLEU-1": .., ..., "CIDEr": ..}`` (0-100).
    """
    ids = [k for k in res if k in gts]
    if not ids:
        raise ValueError("no generated caption has references")
    g = {k: list(gts[k]) for k in ids}
    r = {k: [res[k]] for k in ids}
    tok = ptb_tokenize if tokenizer == "ptb" else simple_tokenize
    g, r = tok(g), tok(r)
    # an empty hypothesis breaks some scorers; give it a placeholder token that matches nothing
    r = {k: [v[0] if v and v[0].strip() else "<empty>"] for k, v in r.items()}
    out: dict = {}
    with contextlib.redirect_stdout(sys.stderr):  # the scorers print; stdout carries data only
        if "BLEU" in metrics:
            from pycocoevalcap.bleu.bleu import Bleu

            b, _ = Bleu(4).compute_score(g, r, verbose=0)
            for i, v in enumerate(b, 1):
                out[f"BLEU-{i}"] = 100.0 * v
        if "METEOR" in metrics:
            from pycocoevalcap.meteor.meteor import Meteor

            m = Meteor()
            try:
                out["METEOR"] = 100.0 * meteor_score(m, g, r)[0]
            finally:
                del m
        if "ROUGE-L" in metrics:
            from pycocoevalcap.rouge.rouge import Rouge

            out["ROUGE-L"] = 100.0 * Rouge().compute_score(g, r)[0]
        if "CIDEr" in metrics:
            from pycocoevalcap.cider.cider import Cider

            out["CIDEr"] = 100.0 * Cider().compute_score(g, r)[0]
    return {k: round(float(v), 2) for k, v in out.items()}


# ----------------------------------------------------------------------------- CIDEr-D reward


def _ngrams(words: list[str], n: int = 4) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i : i + k])] += 1
    return c


class CiderD:
    """CIDEr-D (sigma 6, clipped counts, length penalty, x10) with corpus document frequencies.

    ``refs_corpus``: a list of reference lists (one list of token lists per image) whose
    n-gram document frequencies define the idf.  ``score(cands, refs)`` scores token lists
    ``cands[i]`` against token-list references ``refs[i]``.
    """

    def __init__(self, refs_corpus: list[list[list[str]]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        df: Counter = Counter()
        for refs in refs_corpus:
            seen = set()
            for r in refs:
                seen.update(_ngrams(r, n))
            df.update(seen)
        self.df = df
        self.log_n = math.log(float(max(len(refs_corpus), 1)))
        self._cache: dict = {}

    def _vec(self, words: list[str]):
        counts = _ngrams(words, self.n)
        vec = [defaultdict(float) for _ in range(self.n)]
        norm = [0.0] * self.n
        for g, tf in counts.items():
            k = len(g) - 1
            v = tf * (self.log_n - math.log(max(1.0, self.df.get(g, 0.0))))
            vec[k][g] = v
            norm[k] += v * v
        return vec, [math.sqrt(x) for x in norm], len(words)

    def _ref_vecs(self, refs: list[list[str]]):
        key = tuple(tuple(r) for r in refs)
        v = self._cache.get(key)
        if v is None:
            v = [self._vec(r) for r in refs]
            if len(self._cache) > 50000:
                self._cache.clear()
            self._cache[key] = v
        return v

    def _sim(self, a, b) -> list[float]:
        (va, na, la), (vb, nb, lb) = a, b
        delta = la - lb
        out = []
        for k in range(self.n):
            s = 0.0
            for g, x in va[k].items():
                y = vb[k].get(g)
                if y is not None:
                    s += min(x, y) * y
            if na[k] and nb[k]:
                s /= na[k] * nb[k]
            else:
                s = 0.0
            out.append(s * math.exp(-(delta * delta) / (2 * self.sigma ** 2)))
        return out

    def score_one(self, cand: list[str], refs: list[list[str]]) -> float:
        vc = self._vec(cand)
        rv = self._ref_vecs(refs)
        total = [0.0] * self.n
        for r in rv:
            for k, s in enumerate(self._sim(vc, r)):
                total[k] += s
        return 10.0 * sum(total) / self.n / max(len(rv), 1)

    def score(self, cands: list[list[str]], refs: list[list[list[str]]]) -> list[float]:
        return [self.score_one(c, r) for c, r in zip(cands, refs)]


# ----------------------------------------------------------------------------- METEOR reward


def meteor_score(m, gts: dict, res: dict):
    """``m.compute_score(gts, res)`` of a pycocoevalcap ``Meteor``, with a one-line error when its Java process has
    stopped (killed, out of memory): the wrapper would keep its lock on the failed read, and its ``__del__`` would
    then wait for that lock forever."""
    from vsa.errors import VsaError

    try:
        return m.compute_score(gts, res)
    except (ValueError, OSError) as e:  # an empty line from a dead process; a broken pipe
        m.meteor_p.kill()
        code = m.meteor_p.wait()
        try:  # closed here, so that the wrapper's __del__ has no broken pipe left to report
            m.meteor_p.stdin.close()
        except OSError:
            pass
        if m.lock.locked():
            m.lock.release()
        raise VsaError(f"the METEOR scorer's Java process stopped (exit code {code}; {type(e).__name__}): "
                       "check that Java runs and has memory (`java -Xmx2G -version`)") from None


class MeteorSegments:
    """Per-sentence METEOR 1.5 (pycocoevalcap's jar, ``-norm``: the scorer of :func:`score_captions`) of token
    lists against token-list references, one Java process for the scorer's life (~1000 sentences/s).
    An empty candidate scores 0 without asking Java."""

    def __init__(self):
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            self._m = Meteor()
        except (OSError, ImportError) as e:  # no java on PATH, no pycocoevalcap
            from vsa.errors import VsaError

            raise VsaError(f"a METEOR reward needs Java and pycocoevalcap ({e}): install a Java runtime "
                           "or set scst_meteor=0") from None

    def score(self, cands: list[list[str]], refs: list[list[list[str]]]) -> list[float]:
        keep = [i for i, c in enumerate(cands) if c]
        out = [0.0] * len(cands)
        if keep:
            gts = {j: [" ".join(r) for r in refs[i]] for j, i in enumerate(keep)}
            res = {j: [" ".join(cands[i])] for j, i in enumerate(keep)}
            _, per = meteor_score(self._m, gts, res)
            for j, i in enumerate(keep):
                out[i] = float(per[j])
        return out


class MixedReward:
    """``CIDEr-D + meteor_weight x METEOR`` per sentence: the reward of self-critical training with
    ``scst_meteor`` > 0 (METEOR weighs recall 9:1, so it asks for the content CIDEr-D's precision leaves out).
    ``end`` (CIDEr-D's sentence-end token) is dropped from what METEOR reads."""

    def __init__(self, cider: CiderD, meteor_weight: float, end: str, meteor: MeteorSegments | None = None):
        self.cider, self.weight, self.end = cider, float(meteor_weight), end
        self.meteor = meteor if meteor is not None else MeteorSegments()

    def score(self, cands: list[list[str]], refs: list[list[list[str]]]) -> list[float]:
        c = self.cider.score(cands, refs)
        strip = lambda ws: [w for w in ws if w != self.end]  # noqa: E731
        m = self.meteor.score([strip(x) for x in cands], [[strip(r) for r in rs] for rs in refs])
        return [a + self.weight * b for a, b in zip(c, m)]
