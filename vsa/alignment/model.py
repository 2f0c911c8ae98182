"""The alignment model: regions and words in one space (Karpathy & Fei-Fei 2015, section 3.1).

* Image: every region's CNN feature is projected, ``v_i = W_m cnn_i + b_m`` (eq. 1).
* Sentence: the bidirectional RNN of eq. 2-6: a word embedding, a ReLU layer, a forward and a
  backward recurrent pass and a combined ReLU output ``s_t`` per word; GRU and LSTM cells are
  options (``AlignConfig.rnn``).
* Image-sentence score: ``S_kl = sum_t max_i v_i . s_t`` (eq. 8), with the paper's other
  variants as ablations (``AlignConfig.score``):

  ``sum-max``   the paper's score (eq. 8)
  ``mean-max``  the same averaged over the words (long sentences do not win by length)
  ``sum-all``   ``sum_t sum_i max(0, v_i . s_t)``, the paper's first, simpler score (eq. 7)
  ``global``    one vector per side: the whole-image region against the mean word vector
  ``scan``      beyond the paper, text-to-image attention as in SCAN (Lee et al. 2018, t2i, average pooling):
                each word attends over the image's regions, ``a_t = sum_i softmax_i(lambda v_i . s_t) v_i``,
                and the score averages ``cos(s_t, a_t)`` over the words (``scan_lambda``)

* Loss: the bidirectional max-margin ranking loss (eq. 9) over the batch, summing the
  violations (``loss="sum"``) or taking the hardest negative (``loss="max"``, VSE++).

``--model whole-image`` (the ablation) is :class:`WholeImageModel`: the whole-image feature
through one linear map, a GRU over the words, cosine score.  Both models share one
interface (``embed_images``, ``embed_sentences``, ``score``), so training, retrieval and
search are written once.

For other stages: :func:`load_aligner` gives an :class:`Aligner` with ``vocab``,
``extractor_meta`` and ``word_region_scores(region_feats, tokens) -> [T, R]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vsa.assets import SHIPPED_MODELS
from vsa.errors import VsaError
from vsa.features.store import image_rows, pad_regions  # the one region layout and padding
from vsa.nn import Dropout, Standardize

ASSET = SHIPPED_MODELS["align"]  # the Flickr8k aligner shipped in the package
SCORES = ("sum-max", "mean-max", "sum-all", "global", "scan")
RNNS = ("brnn", "gru", "lstm")
MODELS = ("brnn", "whole-image")
GLOBAL_ENCODERS = ("mean", "gru")


@dataclass
class AlignModelConfig:
    """The alignment model's architecture: everything needed to rebuild it (training settings are
    :class:`vsa.alignment.train.AlignTrainConfig`). The defaults are the shipped aligner's (``cells`` comes from the
    features)."""

    model: str = "brnn"  # brnn (the paper) | whole-image (ablation baseline)
    rnn: str = "brnn"  # brnn (ReLU RNN as in the paper) | gru | lstm
    score: str = "mean-max"  # sum-max (paper eq. 8) | mean-max | sum-all (eq. 7) | global | scan (SCAN t2i attention)
    scan_lambda: float = 9.0  # score = "scan": inverse temperature of the word-to-region attention (SCAN's lambda_1)
    global_weight: float = 1.0  # add this times a global score (whole image vs. sentence) to `score`
    global_encoder: str = "gru"  # the global term's sentence vector: gru (own GRU + image map) | mean (of the word vectors)
    hidden: int = 512  # h: size of the shared region/word space
    embed: int = 300  # word vector size
    norm: bool = True  # L2-normalise region and word vectors
    standardize: bool = True  # centre/scale CNN features with the train set's mean and std
    out_relu: bool = False  # ReLU on the word output layer (eq. 6; with L2-normalised vectors it can die: off)
    max_regions: int = 20  # whole image + 19 detections
    cells: int = 0  # g: the features' g x g image cells after the boxes (`vsa embed --cells`; set from the features)
    max_len: int = 40  # words per training and eval sentence (longer ones are cut; a trained Aligner reads all)
    dropout: float = 0.2  # on word embeddings / RNN outputs
    dropout_regions: float = 0.2  # on CNN features
    region_drop: float = 0.0  # training only: each region row but the whole image is left out with this probability


def region_rows(cfg: AlignModelConfig) -> int:
    """Rows of an image's features the model reads: 1 for the whole-image model, else the whole image, up to
    ``max_regions - 1`` boxes and the ``cells`` x ``cells`` cells."""
    return 1 if cfg.model == "whole-image" else image_rows(cfg.max_regions, cfg.cells)


def features_key(cfg: AlignModelConfig) -> str:
    """The vsa.toml key naming the features an aligner of this config reads by default: the whole images for the
    whole-image model, the regions otherwise."""
    return "features.whole" if cfg.model == "whole-image" else "features.regions"


def check_rows(cfg: AlignModelConfig, store) -> None:
    """Refuse features whose image cells differ from the model's (``vsa embed --cells``), and features with cells
    and more boxes per image than the model reads: the rows are read as one slice from the top
    (:func:`region_rows`), so extra boxes would push the cells out."""
    cells = int(store.meta.get("cells") or 0)
    if cfg.model != "whole-image" and cells != cfg.cells:
        raise VsaError(f"the model was trained on features with {cfg.cells} x {cfg.cells} image cells per image "
                       f"(`vsa embed --cells {cfg.cells}`) but these have {cells} x {cells}", store.path)
    if cells and cfg.model != "whole-image" and len(store.offsets) > 1:
        most = int(np.diff(store.offsets).max()) - cells * cells
        if most > cfg.max_regions:
            raise VsaError(f"an image has {most} regions besides its {cells} x {cells} cells but the model reads "
                           f"{cfg.max_regions} (max_regions); embed fewer boxes or set max_regions={most}",
                           store.path)


def check_config(cfg: AlignModelConfig) -> None:
    """A one-line :class:`VsaError` for a choice the model does not have."""
    for name, allowed in (("model", MODELS), ("rnn", RNNS), ("score", SCORES), ("global_encoder", GLOBAL_ENCODERS)):
        if getattr(cfg, name) not in allowed:
            raise VsaError(f"unknown {name} {getattr(cfg, name)!r} (expected one of {', '.join(allowed)})")
    if cfg.hidden < 1:
        raise VsaError("hidden >= 1 is required")
    if not 0.0 <= cfg.region_drop < 1.0:
        raise VsaError(f"region_drop must be in [0, 1), got {cfg.region_drop}")


def _l2(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


def _rows_to_padded(x: torch.Tensor, rows: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """``x [N, h]`` placed at the flat positions ``rows [N]`` of a zero ``[B, T, h]`` tensor (``index_copy``: its
    gradient is an ``index_select``; ``masked_scatter``'s is a ``masked_select`` with a broadcast mask: 6.0 ms against
    0.11 ms for a Flickr8k batch's word vectors, 2.8 against 0.06 ms for its region vectors, at 1 thread)."""
    return x.new_zeros(B * T, x.shape[-1]).index_copy(0, rows, x).view(B, T, -1)


class RegionEncoder(nn.Module):
    """``v_i = W_m cnn_i + b_m`` for every region (eq. 1), optionally L2-normalised."""

    def __init__(self, feat_dim: int, hidden: int, dropout: float = 0.0, norm: bool = True):
        super().__init__()
        self.stats = Standardize(feat_dim)
        self.proj = nn.Linear(feat_dim, hidden)
        self.drop = Dropout(dropout)
        self.norm = norm

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # [B, R, D] -> [B, R, h]
        if mask is None or bool(mask.all()):
            v = self.proj(self.drop(self.stats(feats)))
            return _l2(v) if self.norm else v
        rows = mask.flatten().nonzero()[:, 0]  # only real regions (images have ~10 of 20 on average)
        v = self.proj(self.drop(self.stats(feats.flatten(0, 1).index_select(0, rows))))
        return _rows_to_padded(_l2(v) if self.norm else v, rows, *feats.shape[:2])


class ReluBRNN(nn.Module):
    """The paper's recurrence (eq. 4-5) on inputs ``e [B, T, h]``, both directions in one loop:
    ``h^f_t = f(e_t + W_f h^f_{t-1} + b_f)``, ``h^b_t = f(e_t + W_b h^b_{t+1} + b_b)``.
    Returns ``h^f + h^b`` (the input of eq. 6), zero at padded positions."""

    def __init__(self, hidden: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(2, hidden, hidden))
        self.b = nn.Parameter(torch.zeros(2, 1, hidden))
        with torch.no_grad():  # start near the identity map of a leaky integrator: stable ReLU recurrence
            self.W.copy_(torch.randn(2, hidden, hidden) * (0.5 / math.sqrt(hidden)))

    def forward(self, e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, h = e.shape
        # sentences longest first, so that the ones still running at step t are a prefix of the batch: each step
        # computes only those rows (Flickr8k batches are padded to about twice their mean length)
        order = torch.argsort(lengths, descending=True, stable=True)
        lengths = lengths[order]
        e = e[order]
        ar = torch.arange(T, device=e.device)
        mask = (ar[None, :] < lengths[:, None]).to(e.dtype)  # [B, T]
        # backward direction: reverse every sequence inside its own length
        rev = (lengths[:, None] - 1 - ar[None, :]).clamp(min=0)  # [B, T]
        e_rev = e.gather(1, rev[..., None].expand(B, T, h))
        # the steps' inputs as views taken once: indexing x[:, :, t] in the loop would make each step's backward
        # zero-fill a gradient of x's full size (15% of a training step on CPUs)
        xs = torch.stack((e, e_rev)).unbind(2)  # T x [2, B, h]
        running = (lengths[None, :] > ar[:, None]).sum(1).tolist()  # sentences still running at each step
        state = e.new_zeros(2, B, h)
        outs = []
        for t in range(T):
            n = running[t]
            state = F.relu(xs[t][:, :n] + torch.bmm(state[:, :n], self.W) + self.b)
            outs.append(F.pad(state, (0, 0, 0, B - n)) if n < B else state)
        fwd, bwd = torch.stack(outs, 2).unbind(0)  # [B, T, h] each (unbind: no zero-filled gradient of the stack)
        bwd = bwd.gather(1, rev[..., None].expand(B, T, h))
        out = (fwd + bwd) * mask[..., None]
        return out[torch.argsort(order)]


def last_state(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor, drop: nn.Module | None = None) -> torch.Tensor:
    """The state of a forward GRU after each sentence's last word, ``[B, T, e] -> [B, h]``; the packed input skips
    the padding (about half of a Flickr8k batch), so the result is that of the padded run, at half its cost.
    ``drop`` (dropout) applies to the real words' inputs only.

    On the CPU the one-layer GRU's recurrence is written out here (torch's gate order and equations, the module's
    own weights): PyTorch's packed CPU GRU zero-fills a gradient the size of all input gates at every step of its
    backward pass, a twentieth of the shipped aligner's training step. Elsewhere (cuDNN) the module runs."""
    from torch.nn.utils.rnn import pack_padded_sequence

    packed = pack_padded_sequence(x, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
    if drop is not None:
        packed = packed._replace(data=drop(packed.data))
    if x.device.type != "cpu" or gru.num_layers != 1 or gru.bidirectional or not gru.bias:
        return gru(packed)[1][-1]
    # the packed data is time-major, longest sentence first: at each step the sentences still running are a prefix
    gates_x = F.linear(packed.data, gru.weight_ih_l0, gru.bias_ih_l0).split(packed.batch_sizes.tolist())
    h = x.new_zeros(int(packed.batch_sizes[0]), gru.hidden_size)
    ended = []  # the final states of the sentences that ended, shortest first
    for gx in gates_x:
        n = gx.shape[0]
        if n < h.shape[0]:
            ended.append(h[n:])
            h = h[:n]
        x_r, x_z, x_n = gx.chunk(3, 1)
        h_r, h_z, h_n = F.linear(h, gru.weight_hh_l0, gru.bias_hh_l0).chunk(3, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        cand = torch.tanh(x_n + r * h_n)
        h = cand + z * (h - cand)  # (1 - z) * cand + z * h
    ended.append(h)
    return torch.cat(ended[::-1])[packed.unsorted_indices]


class SentenceBRNN(nn.Module):
    """Word vectors ``s_t`` (eq. 2-6): embedding, ReLU layer, forward + backward pass, ReLU output.

    ``rnn="brnn"`` is the paper's ReLU recurrence (:class:`ReluBRNN`); ``gru``/``lstm`` swap in
    those cells (bidirectional, on the ReLU layer's output). Forward and backward states are
    added (eq. 6) before the output layer.
    """

    def __init__(self, vocab_size: int, embed: int, hidden: int, rnn: str = "brnn", dropout: float = 0.0,
                 norm: bool = True, out_relu: bool = True):
        super().__init__()
        if rnn not in RNNS:
            raise VsaError(f"unknown rnn {rnn!r} (expected one of {', '.join(RNNS)})")
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.inp = nn.Linear(embed, hidden)  # e_t = f(W_e x_t + b_e)
        if rnn == "brnn":
            self.rnn = ReluBRNN(hidden)
        elif rnn == "gru":
            self.rnn = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        else:
            self.rnn = nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(hidden, hidden)  # s_t = f(W_d (h^f_t + h^b_t) + b_d)
        self.drop = Dropout(dropout)
        self.hidden = hidden
        self.norm = norm
        self.out_relu = out_relu

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, h]
        # the layers around the recurrence see the real words only (a Flickr8k batch is about half padding):
        # the same values at the words, zero at padded positions
        B, T = ids.shape
        words = (torch.arange(T, device=ids.device)[None, :] < lengths[:, None]).flatten().nonzero()[:, 0]  # [Nw]
        e = F.relu(self.inp(self.drop(self.embed(ids.flatten()[words]))))  # [Nw, h]
        e = _rows_to_padded(e, words, B, T)
        if isinstance(self.rnn, ReluBRNN):
            h = self.rnn(e, lengths)
        else:
            from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

            packed = pack_padded_sequence(e, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
            h, _ = self.rnn(packed)
            h, _ = pad_packed_sequence(h, batch_first=True, total_length=T)
            h = h[..., : self.hidden] + h[..., self.hidden :]
        s = self.out(self.drop(h.reshape(B * T, -1).index_select(0, words)))  # [Nw, h]
        if self.out_relu:
            s = F.relu(s)
        return _rows_to_padded(_l2(s) if self.norm else s, words, B, T)


def pair_scores(V: torch.Tensor, vmask: torch.Tensor, S: torch.Tensor, smask: torch.Tensor,
                score: str = "sum-max", scan_lambda: float = 9.0) -> torch.Tensor:
    """Image-sentence scores ``[Bi, Bs]`` from region vectors ``V [Bi, R, h]`` and word vectors ``S [Bs, T, h]``.

    ``vmask [Bi, R]`` and ``smask [Bs, T]`` mark real regions / words (padding is ignored).
    """
    Bi = V.shape[0]
    if score == "global":
        return flat_pair_scores(V[:, 0], torch.arange(Bi, device=V.device), Bi, S, smask, score)
    return flat_pair_scores(V[vmask], vmask.nonzero(as_tuple=True)[0], Bi, S, smask, score, scan_lambda)


def flat_pair_scores(Vr: torch.Tensor, reg_img: torch.Tensor, Bi: int, S: torch.Tensor, smask: torch.Tensor,
                     score: str = "sum-max", scan_lambda: float = 9.0) -> torch.Tensor:
    """:func:`pair_scores` from the real regions only, unpadded: ``Vr [Nr, h]`` and the image of each region
    ``reg_img [Nr]`` (sorted, each image's whole-image region first), ``Bi`` images. A search index keeps its
    region vectors this way, so a query scores every photo without padding them. With ``score = "global"``,
    ``Vr`` holds the whole-image vectors alone, ``[Bi, h]``."""
    Bs = S.shape[0]
    if score == "global":
        s = (S * smask[..., None]).sum(1) / smask.sum(1, keepdim=True).clamp(min=1)
        return _l2(Vr) @ _l2(s).T
    # only real words take part: [Nw, h] with the sentence of each word
    word_sent = smask.nonzero(as_tuple=True)[0]
    Sw = S[smask]
    Nw = Sw.shape[0]
    d = Vr @ Sw.T  # [Nr, Nw]
    if score == "sum-all":
        per_word = d.new_zeros(Bi, Nw).index_add_(0, reg_img, d.clamp(min=0))  # [Bi, Nw]
    else:
        per_word = d.new_full((Bi, Nw), float("-inf")).scatter_reduce(
            0, reg_img[:, None].expand(-1, Nw), d, "amax", include_self=True)  # [Bi, Nw]
    if score == "scan":
        per_word = _scan_t2i(Vr, reg_img, Bi, d, per_word, scan_lambda)
    total = per_word.new_zeros(Bi, Bs).index_add_(1, word_sent, per_word)
    if score in ("mean-max", "scan"):
        total = total / smask.sum(1).clamp(min=1).view(1, Bs).to(total.dtype)
    return total


def _scan_t2i(Vr, reg_img, Bi: int, d, dmax, lam: float) -> torch.Tensor:
    """``cos(s_t, a_t)`` ``[Bi, Nw]`` for every image and word, ``a_t`` the softmax(``lam`` d)-weighted sum of the
    image's region vectors: the numerator is ``sum_i alpha_i d_i``, ``|a_t|^2 = alpha^T G alpha`` with the
    image's region Gram matrix ``G`` (no ``[Bi, Nw, h]`` tensor is made). ``d [Nr, Nw]`` are the region-word
    dots, ``dmax [Bi, Nw]`` their per-image maxima (for a stable softmax)."""
    Nw = d.shape[1]
    e = torch.exp(lam * (d - dmax[reg_img]))  # [Nr, Nw]
    Z = d.new_zeros(Bi, Nw).index_add_(0, reg_img, e)
    alpha = e / Z[reg_img]
    num = d.new_zeros(Bi, Nw).index_add_(0, reg_img, alpha * d)
    pos = torch.arange(len(reg_img), device=d.device) - _first_rows(reg_img, Bi)[reg_img]  # row within its image
    R = int(pos.max()) + 1 if len(pos) else 1
    Vp = Vr.new_zeros(Bi, R, Vr.shape[1])
    Vp[reg_img, pos] = Vr
    Ap = d.new_zeros(Bi, R, Nw)
    Ap[reg_img, pos] = alpha
    sq = ((Vp @ Vp.transpose(1, 2)) @ Ap * Ap).sum(1)  # [Bi, Nw]
    return num / sq.clamp_min(1e-12).sqrt()


def _first_rows(reg_img: torch.Tensor, Bi: int) -> torch.Tensor:
    """The row of each image's first (whole-image) region in a flat region list sorted by image."""
    counts = torch.bincount(reg_img, minlength=Bi)
    return torch.cumsum(counts, 0) - counts


def ranking_loss(scores: torch.Tensor, img_of: torch.Tensor | None = None, margin: float = 0.2,
                 hardest: bool = False) -> torch.Tensor:
    """Bidirectional max-margin ranking loss (eq. 9) over a batch.

    ``scores [U, B]``: U distinct images against B sentences; sentence j belongs to image
    ``img_of[j]`` (default: ``j``, one sentence per image). Other sentences of the same image are
    never negatives. For each true pair, image annotation penalises sentences of other images
    scoring within ``margin`` of it, image search penalises other images. ``hardest`` keeps only
    the largest violation per true pair and direction (VSE++); otherwise all are summed.
    Returns the mean over the B true pairs.
    """
    U, B = scores.shape
    if img_of is None:
        img_of = torch.arange(B, device=scores.device)
    cols = torch.arange(B, device=scores.device)
    pos = scores[img_of, cols]  # [B]
    other = img_of[None, :] != torch.arange(U, device=scores.device)[:, None]  # [U, B]: image u is not sentence j's
    cost_i = (margin + scores - pos[None, :]).clamp(min=0) * other  # sentence j vs wrong image u
    rows = scores[img_of]  # [B, B]: sentence j's image against every sentence l
    wrong = img_of[None, :] != img_of[:, None]
    cost_s = (margin + rows - pos[:, None]).clamp(min=0) * wrong  # image of j vs wrong sentence l
    if hardest:
        return (cost_s.amax(1).sum() + cost_i.amax(0).sum()) / B
    return (cost_s.sum() + cost_i.sum()) / B


class GlobalBranch(nn.Module):
    """A sentence-level branch beside the word-region alignment (``global_encoder = "gru"``).

    The whole image through its own linear map and the sentence through a GRU (its last state),
    cosine score: the whole-image baseline's pair, trained jointly with the regions.
    """

    def __init__(self, feat_dim: int, embed: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.img = nn.Linear(feat_dim, hidden)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.drop = Dropout(dropout)

    def image(self, std_feats: torch.Tensor) -> torch.Tensor:  # standardised whole-image features [B, D]
        return _l2(self.img(std_feats))

    def sentence(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # word embeddings [B, T, e]
        return _l2(last_state(self.gru, x, lengths, self.drop))


class BRNNAligner(nn.Module):
    """The paper's model: projected regions, BRNN word vectors, ``score`` over word-region dots.

    With ``global_encoder = "gru"`` a :class:`GlobalBranch` adds ``global_weight`` times its cosine
    to the score. Its vectors travel in extra channels after the first ``region_dim`` ones (row 0
    of ``V`` and of ``S``), so every stage keeps the ``embed_images`` / ``embed_sentences`` /
    ``score`` interface; :attr:`region_dim` says where the region/word vectors end.
    """

    kind = "brnn"

    def __init__(self, cfg, vocab_size: int, feat_dim: int):
        super().__init__()
        self.cfg = cfg
        self.regions = RegionEncoder(feat_dim, cfg.hidden, cfg.dropout_regions, cfg.norm)
        self.words = SentenceBRNN(vocab_size, cfg.embed, cfg.hidden, cfg.rnn, cfg.dropout, cfg.norm, cfg.out_relu)
        self.region_dim = cfg.hidden
        if cfg.global_encoder not in GLOBAL_ENCODERS:
            raise VsaError(f"unknown global_encoder {cfg.global_encoder!r} (expected one of {', '.join(GLOBAL_ENCODERS)})")
        self.glob = GlobalBranch(feat_dim, cfg.embed, cfg.hidden, cfg.dropout) if cfg.global_encoder == "gru" else None

    @property
    def stats(self) -> Standardize:
        return self.regions.stats

    def embed_images(self, feats: torch.Tensor, rmask: torch.Tensor):
        p = self.cfg.region_drop
        if self.training and p > 0:  # whole boxes (and cells) left out: every word must do without its usual one
            keep = torch.rand(rmask.shape, device=rmask.device) >= p
            keep[:, 0] = True
            rmask = rmask & keep
        V = self.regions(feats, rmask)
        if self.glob is not None:
            g = torch.zeros_like(V)
            g[:, 0] = self.glob.image(self.regions.drop(self.stats(feats[:, 0])))  # the whole image is region 0
            V = torch.cat((V, g), -1)
        return V, rmask

    def embed_sentences(self, ids: torch.Tensor, lengths: torch.Tensor):
        smask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        S = self.words(ids, lengths)
        if self.glob is not None:
            g = torch.zeros_like(S)
            g[:, 0] = self.glob.sentence(self.words.embed(ids), lengths)
            S = torch.cat((S, g), -1)
        return S, smask

    def score(self, V, vmask, S, smask) -> torch.Tensor:
        return self.flat_score(V[vmask], vmask.nonzero(as_tuple=True)[0], V.shape[0], S, smask)

    def flat_score(self, Vr, reg_img, Bi: int, S, smask, glob_images=None) -> torch.Tensor:
        """:meth:`score` from unpadded region vectors ``Vr [Nr, h]`` of images ``reg_img [Nr]`` (sorted, whole
        image first; :func:`flat_pair_scores`). With a global branch, ``Vr`` may hold the region channels only and
        ``glob_images [Bi, h]`` the branch's image vectors (a search index keeps them apart: half the memory read)."""
        local, glob = self.flat_score_parts(Vr, reg_img, Bi, S, smask, glob_images)
        return local if glob is None else local + self.cfg.global_weight * glob

    def score_parts(self, V, vmask, S, smask):
        """The score's two terms, ``(region score, global score or None)``: :meth:`score` is
        ``region + global_weight * global``."""
        return self.flat_score_parts(V[vmask], vmask.nonzero(as_tuple=True)[0], V.shape[0], S, smask)

    def flat_score_parts(self, Vr, reg_img, Bi: int, S, smask, glob_images=None):
        h = self.region_dim
        first = _first_rows(reg_img, Bi)
        Sr = S[..., :h]
        if self.cfg.score == "global":  # already the whole image against the mean word: only a GRU branch adds to it
            local = flat_pair_scores(Vr[first, :h], reg_img, Bi, Sr, smask, "global")
            if self.glob is None:
                return local, None
        else:
            local = flat_pair_scores(Vr[:, :h], reg_img, Bi, Sr, smask, self.cfg.score, self.cfg.scan_lambda)
        if not self.cfg.global_weight:
            return local, None
        if self.glob is not None:
            G = Vr[first, h:] if glob_images is None else glob_images
            return local, G @ S[:, 0, h:].T
        return local, flat_pair_scores(Vr[first, :h], reg_img, Bi, Sr, smask, "global")  # whole image vs. mean word


class WholeImageModel(nn.Module):
    """The ablation baseline: whole-image feature -> linear, GRU over words -> last state, cosine score."""

    kind = "whole-image"

    def __init__(self, cfg, vocab_size: int, feat_dim: int):
        super().__init__()
        self.cfg = cfg
        self.stats = Standardize(feat_dim)
        self.img = nn.Linear(feat_dim, cfg.hidden)
        self.embed = nn.Embedding(vocab_size, cfg.embed, padding_idx=0)
        self.gru = nn.GRU(cfg.embed, cfg.hidden, batch_first=True)
        self.drop = Dropout(cfg.dropout)
        self.drop_img = Dropout(cfg.dropout_regions)
        self.region_dim = cfg.hidden  # all of its vectors' channels (it has no global branch)

    def embed_images(self, feats: torch.Tensor, rmask: torch.Tensor):
        v = _l2(self.img(self.drop_img(self.stats(feats[:, :1]))))  # the whole image is region 0
        return v, rmask[:, :1]

    def embed_sentences(self, ids: torch.Tensor, lengths: torch.Tensor):
        # forward only: the state at the last word
        s = _l2(last_state(self.gru, self.embed(ids), lengths, self.drop))[:, None, :]
        return s, torch.ones(ids.shape[0], 1, dtype=torch.bool, device=ids.device)

    def score(self, V, vmask, S, smask) -> torch.Tensor:
        return V[:, 0] @ S[:, 0].T

    def flat_score(self, Vr, reg_img, Bi: int, S, smask, glob_images=None) -> torch.Tensor:
        return Vr[_first_rows(reg_img, Bi)] @ S[:, 0].T


def build_model(cfg, vocab_size: int, feat_dim: int) -> nn.Module:
    """Factory: ``cfg.model`` is ``brnn`` (the paper) or ``whole-image`` (the ablation)."""
    if cfg.model == "brnn":
        return BRNNAligner(cfg, vocab_size, feat_dim)
    if cfg.model == "whole-image":
        return WholeImageModel(cfg, vocab_size, feat_dim)
    raise VsaError(f"unknown model {cfg.model!r} (expected one of {', '.join(MODELS)})")


# ----------------------------------------------------------------------------- batching helpers


def pad_ids(seqs: list[list[int]], max_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> padded ``[N, T]`` int64 (0 = <pad>) and lengths ``[N]``; empty lists get one <unk>."""
    seqs = [s if s else [1] for s in seqs]
    if max_len:
        seqs = [s[:max_len] for s in seqs]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


# ----------------------------------------------------------------------------- loading a trained aligner


class Aligner:
    """A trained alignment model ready for inference (CPU by default)."""

    def __init__(self, model: nn.Module, cfg: AlignModelConfig, vocab, extractor_meta: dict, path=None,
                 meta: dict | None = None, decoding: dict | None = None):
        self.model = model.eval()
        self.cfg = cfg
        self.vocab = vocab
        self.extractor_meta = dict(extractor_meta or {})
        self.path = path
        self.meta = meta or {}
        self.decoding = dict(decoding or {})  # inference defaults chosen on val: {"beta": ...} for vsa align
        self.aliases = dict(self.meta.get("aliases") or {})  # word outside the vocabulary -> nearest known word
        # training sentences for vsa search's hubness correction (vsa.retrieval.IndexHubnessConfig); [] if none
        self.bank = [str(x).split() for x in self.meta.get("bank") or []]
        # region vectors of training images for vsa search sentences' hubness correction (SentenceHubnessConfig)
        ib = self.meta.get("image_bank")
        self.image_bank = None if not ib else (
            ib["vectors"].float(), torch.repeat_interleave(torch.arange(len(ib["counts"])), ib["counts"].long()))

    def read_as(self, tokens: list[str]) -> dict[str, str]:
        """The words of ``tokens`` outside the vocabulary that the aligner reads as another word (its GloVe
        ``aliases``, saved by ``train-align --glove``): ``{"giraffe": "elephant"}``."""
        stoi = self.vocab.stoi
        return {t: self.aliases[t] for t in tokens if t not in stoi and t in self.aliases}

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode_tokens(self, token_lists: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids, a word outside the vocabulary read as its alias when it has one (:meth:`read_as`); every word
        is kept (the recurrences take any length), so each word of a query or caption has its own vector."""
        stoi, al = self.vocab.stoi, self.aliases
        if al:
            token_lists = [[t if t in stoi else al.get(t, t) for t in toks] for toks in token_lists]
        return pad_ids([self.vocab.encode(t) for t in token_lists])

    @torch.inference_mode()
    def image_vectors(self, region_feats: np.ndarray, full: bool = False) -> np.ndarray:
        """``[R, D]`` CNN features of one image -> ``[R', h]`` region vectors (R' = 1 for whole-image).

        ``full`` keeps the extra channels of a global branch (what ``model.score`` needs)."""
        feats, mask = pad_regions([region_feats])
        V, _ = self.model.embed_images(feats.to(self.device), mask.to(self.device))
        h = V.shape[-1] if full else self.model.region_dim
        return V[0, :, :h].float().cpu().numpy()

    @torch.inference_mode()
    def word_vectors(self, tokens: list[str]) -> np.ndarray:
        """Word vectors ``[T, h]`` of one tokenised sentence (``[1, h]`` for the whole-image model)."""
        ids, lengths = self.encode_tokens([tokens])
        S, smask = self.model.embed_sentences(ids.to(self.device), lengths.to(self.device))
        return S[0][smask[0]][:, : self.model.region_dim].float().cpu().numpy()

    def word_region_scores(self, region_feats: np.ndarray, tokens: list[str]) -> np.ndarray:
        """The ``v_i . s_t`` matrix ``[T, R]`` of one image (``[R, D]`` CNN features) and one sentence."""
        if self.cfg.model != "brnn":
            raise VsaError(f"a '{self.cfg.model}' aligner has no word-region scores (train with --model brnn)", self.path)
        if not tokens:
            return np.zeros((0, len(region_feats)), dtype=np.float32)
        V = self.image_vectors(region_feats)
        S = self.word_vectors(tokens)
        return S @ V.T

    @torch.inference_mode()
    def score(self, region_feats: np.ndarray, tokens: list[str]) -> float:
        """The image-sentence score ``S_kl`` of one image and one sentence."""
        feats, mask = pad_regions([region_feats])
        ids, lengths = self.encode_tokens([tokens])
        dev = self.device
        V, vm = self.model.embed_images(feats.to(dev), mask.to(dev))
        S, sm = self.model.embed_sentences(ids.to(dev), lengths.to(dev))
        return float(self.model.score(V, vm, S, sm)[0, 0])


def aligner_from_checkpoint(ckpt: dict, path=None, device: str = "cpu") -> Aligner:
    from vsa.checkpoint import config_from
    from vsa.data import Vocab

    cfg = config_from(AlignModelConfig, ckpt["model"])
    vocab = Vocab(ckpt["vocab"])
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    feat_dim = int(ckpt["extractor"].get("dim") or sd[_feat_key(cfg)].shape[1])
    model = build_model(cfg, len(vocab), feat_dim)
    try:
        load_weights(model, sd)
    except RuntimeError as e:
        raise VsaError(f"checkpoint weights do not fit the model ({str(e).splitlines()[0][:160]})", path) from None
    model.to(device)
    return Aligner(model, cfg, vocab, ckpt.get("extractor") or {}, path, ckpt.get("meta"), ckpt.get("decoding"))


def load_weights(model: nn.Module, sd: dict) -> None:
    """``load_state_dict``; a checkpoint without the standardisation buffers (``stats.mean`` / ``stats.std``) reads
    its features as they are (mean 0, std 1)."""
    own = model.state_dict()
    sd = dict(sd)
    for k in own:
        if k not in sd and k.endswith(("stats.mean", "stats.std")):
            sd[k] = own[k]
    model.load_state_dict(sd)


def _feat_key(cfg) -> str:
    return "regions.proj.weight" if cfg.model == "brnn" else "img.weight"


def load_aligner(path=None, device: str = "cpu") -> Aligner:
    """A trained aligner from ``path`` (default: the one shipped with vsa, trained on Flickr8k)."""
    from vsa.checkpoint import load_checkpoint

    p = Path(path) if path is not None else ASSET
    if path is None and not p.exists():
        raise VsaError("the shipped aligner is missing from this install; pass --model CKPT "
                       "(train one with `vsa train-align`)", p)
    ckpt = load_checkpoint(p, kind="align")
    return aligner_from_checkpoint(ckpt, p, device)


@torch.inference_mode()
def image_bank(model, feats: torch.Tensor, rmask: torch.Tensor) -> dict:
    """The image bank an aligner keeps for ``vsa search sentences`` (:class:`vsa.retrieval.SentenceHubnessConfig`):
    the region vectors (all channels, float16) of the images ``feats [B, R, D]`` / ``rmask`` as one ``[N, h]`` tensor
    and each image's row count."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    V, vm = model.embed_images(feats.to(dev), rmask.to(dev))
    model.train(was)
    return {"vectors": V[vm].half().cpu(), "counts": vm.sum(1).int().cpu()}


def export_aligner(src, dst, half: bool = True, beta: float | None = None, aliases: str | None = None,
                   bank=None, image_bank_features=None) -> dict:
    """Write a compact inference copy of a trained aligner (float16 weights, no optimiser state).

    This is how ``vsa/assets/align-flickr8k.pt`` is made: ``python -m vsa.alignment.model SRC DST [BETA] [--aliases kumo]``;
    ``beta`` (the snippet MRF's val-chosen beta for this aligner) is saved in its decoding defaults for ``vsa align``;
    ``aliases`` (a GloVe spec as ``--glove`` takes) makes the out-of-vocabulary aliases
    (:func:`vsa.alignment.glove.glove_aliases`) for a checkpoint trained without them; ``bank`` (a caption dataset) adds the
    sentences ``vsa search`` corrects hubness with (:func:`vsa.retrieval.bank_sentences` of its train split), as
    ``vsa train-align`` saves them; with ``image_bank_features`` (the features file it was trained on) also the region
    vectors of the first :attr:`SentenceHubnessConfig.images` train images of that dataset (:func:`image_bank`).
    """
    from vsa.checkpoint import export_checkpoint, load_checkpoint

    extra = {}
    if aliases:
        from vsa.alignment.glove import glove_aliases

        extra["aliases"] = glove_aliases(list(load_checkpoint(src, kind="align")["vocab"]), aliases)
    if bank:
        from vsa.data import load_dataset
        from vsa.retrieval import bank_sentences

        extra["bank"] = bank_sentences(load_dataset(bank).split("train"))
    if image_bank_features:
        if not bank:
            raise VsaError("an image bank needs the dataset (--bank DATASET) to take its training images from")
        from vsa.data import load_dataset
        from vsa.features.store import RegionBank, load_features
        from vsa.retrieval import SentenceHubnessConfig

        al = load_aligner(src)
        store = load_features(image_bank_features)
        recs = store.check_dataset([r for r in load_dataset(bank).split("train") if r.sentences])
        rows = RegionBank(store, [r.key for r in recs[: SentenceHubnessConfig.images]], region_rows(al.cfg))
        idx = torch.arange(len(rows))
        extra["image_bank"] = image_bank(al.model, rows[idx], rows.mask[idx])  # the train split's first images
    keep = ("epoch", "best", "seconds", "dataset", "train_images", "test", "aliases", "bank", "image_bank")
    return export_checkpoint(src, dst, "align", keep, half, {"beta": float(beta)} if beta is not None else None, extra)


if __name__ == "__main__":  # python -m vsa.alignment.model SRC DST [BETA] [--aliases GLOVE] [--bank DATASET [--image-bank F]]
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vsa.alignment.model", description="Export a trained aligner for shipping.")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("beta", nargs="?", type=float, default=None)
    ap.add_argument("--aliases", default=None, help="GloVe (kumo or a path) for out-of-vocabulary aliases")
    ap.add_argument("--bank", default=None, help="caption dataset whose train sentences make the search hubness bank")
    ap.add_argument("--image-bank", default=None, help="features file of --bank's images: adds the image bank of vsa "
                    "search sentences")
    a = ap.parse_args()
    if a.image_bank and not a.bank:
        ap.error("--image-bank needs --bank DATASET (the image bank is that dataset's first training images)")
    info = export_aligner(a.src, a.dst, beta=a.beta, aliases=a.aliases, bank=a.bank, image_bank_features=a.image_bank)
    info["aliases"] = len(info.get("aliases") or {})
    info["bank"] = len(info.get("bank") or [])
    info["image_bank"] = len((info.get("image_bank") or {}).get("counts", []))
    print(info)
