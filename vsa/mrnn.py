"""The multimodal RNN caption generator (paper Sec. 3.2) and an LSTM variant.

Paper RNN (``rnn="rnn"``)::

    b_v = W_hi CNN(I)
    h_t = relu(W_hx x_t + W_hh h_{t-1} + b_h + 1(t=1) * b_v)
    y_t = softmax(W_oh h_t + b_o)

with x_1 the ``<start>`` embedding and ``<end>`` closing the sentence.

Top-down attention (``rnn="updown"``, Anderson et al. 2018): an attention LSTM reads the
previous language state, the global (whole-image) feature and the word; its state attends
over the regions (the grid cells of ``vsa embed --crop grid`` or detector boxes); a language
LSTM reads the attended feature and the attention state and predicts the word.

LSTM variant (``rnn="lstm"``, neuraltalk2 style): the projected image is the LSTM's
input at step 0, then ``<start>`` and the words.  With ``attention=True`` each step
also reads a soft-attention mix of the image's region features (whole image + detector
boxes, Show-Attend-Tell style); with one region per image it reduces to the plain model.

Both expose one step interface for decoding (:meth:`CaptionModel.init_state`,
:meth:`CaptionModel.step`) and a teacher-forced :meth:`CaptionModel.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MRNNConfig:
    """The generator's architecture: everything needed to rebuild it (training settings are
    :class:`vsa.train_mrnn.MRNNTrainConfig`, decoding defaults :class:`vsa.decoding.DecodingConfig`)."""

    rnn: str = "updown"  # "updown" (top-down attention over regions/grid), "lstm", or "rnn" (the paper's multimodal RNN)
    vocab_size: int = 0  # including the 4 special tokens (set from the vocabulary)
    feat_dim: int = 1280  # set from the features
    embed: int = 512
    hidden: int = 512
    dropout: float = 0.3  # on embeddings, attention features and outputs (0.5 before 2026-12-03; 0.3: val CIDEr 44.88 vs 44.78)
    attention: bool = False  # lstm/rnn: attend over the region features (needs a regions features file)
    att_dim: int = 256
    max_regions: int = 64  # regions per image read from a regions/grid features file (whole image first)
    cells: int = 0  # g: the features' g x g image cells after the boxes (`vsa embed --cells`; set from the features)


def _getter(cfg):
    """``get(key, default)`` over a config dataclass or its dict form (as a checkpoint stores it)."""
    return cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)


def region_rows(cfg) -> int:
    """Rows of an image's features a region/grid generator reads: the whole image and up to ``max_regions - 1``
    boxes (or grid cells), then the ``cells`` x ``cells`` image cells of ``vsa embed --cells`` features."""
    get = _getter(cfg)
    return int(get("max_regions", 64)) + int(get("cells", 0) or 0) ** 2


RNNS = ("rnn", "lstm", "updown")


def features_key(cfg) -> str:
    """The vsa.toml key naming the features a generator of this config reads by default: the grid cells
    for Up-Down, the detector regions for an attention LSTM/RNN, the whole image otherwise."""
    get = _getter(cfg)
    if get("rnn") == "updown":
        return "features.grid"
    return "features.regions" if get("attention", False) else "features.whole"


def uses_regions(cfg) -> bool:
    """Does the model read region features ``[B, R, D]`` (attention or Up-Down) rather than one vector?"""
    get = _getter(cfg)
    return bool(get("attention", False)) or get("rnn") == "updown"


class CaptionModel(nn.Module):
    def __init__(self, cfg: MRNNConfig):
        super().__init__()
        if cfg.rnn not in ("rnn", "lstm"):
            raise ValueError(f"unknown rnn {cfg.rnn!r} ({', '.join(RNNS)})")
        self.cfg = cfg
        V, E, H, D = cfg.vocab_size, cfg.embed, cfg.hidden, cfg.feat_dim
        # feature standardisation, set from the training features (buffers: saved, not trained)
        self.register_buffer("feat_mean", torch.zeros(D))
        self.register_buffer("feat_std", torch.ones(D))
        self.embed = nn.Embedding(V, E, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        ctx = 0
        if cfg.attention:
            ctx = D
            self.att_feat = nn.Linear(D, cfg.att_dim)
            self.att_h = nn.Linear(H, cfg.att_dim, bias=False)
            self.att_v = nn.Linear(cfg.att_dim, 1)
        if cfg.rnn == "rnn":
            self.W_hx = nn.Linear(E + ctx, H)  # bias is b_h
            self.W_hh = nn.Linear(H, H, bias=False)
            self.W_hi = nn.Linear(D, H)  # b_v = W_hi CNN(I)
        else:
            self.img = nn.Linear(D, E)
            if cfg.attention:
                self.cell = nn.LSTMCell(E + ctx, H)
            else:  # fused: teacher forcing runs all steps in one call
                self.lstm = nn.LSTM(E, H, batch_first=True)
        self.out = nn.Linear(H, V)  # W_oh, b_o

    # ------------------------------------------------------------------ state

    def normalise(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.feat_mean) / self.feat_std

    def init_state(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """``feats``: ``[B, D]`` (whole image) or ``[B, R, D]`` (regions, whole image first)
        with ``mask`` ``[B, R]`` (True = real region). Returns the state before ``<start>``."""
        if feats.dim() == 2:
            feats = feats[:, None]
        if mask is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        feats = self.normalise(feats.float())
        glob = feats[:, 0]
        B, H = feats.shape[0], self.cfg.hidden
        z = feats.new_zeros(B, H)
        st: dict = {}
        if self.cfg.attention:
            st["regions"] = feats
            st["att_keys"] = self.att_feat(feats)
            st["mask"] = mask
        if self.cfg.rnn == "rnn":
            st["h"] = z
            st["bv"] = self.W_hi(self.drop(glob))
        else:
            x = self.drop(self.img(self.drop(glob)))
            if self.cfg.attention:
                x = torch.cat([x, self._attend(z, st)], 1)
            h, c = self._lstm_step(x, z, z)
            st["h"], st["c"] = h, c
        return st

    def _lstm_step(self, x, h, c):
        if self.cfg.attention:
            return self.cell(x, (h, c))
        _, (h, c) = self.lstm(x[:, None], (h[None].contiguous(), c[None].contiguous()))
        return h[0], c[0]

    def _attend(self, h: torch.Tensor, st: dict) -> torch.Tensor:
        e = self.att_v(torch.tanh(st["att_keys"] + self.att_h(h)[:, None])).squeeze(-1)  # [B, R]
        e = e.masked_fill(~st["mask"], float("-inf"))
        a = torch.softmax(e, dim=1)
        return torch.bmm(a[:, None], st["regions"]).squeeze(1)

    def _core(self, tokens: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        x = self.drop(self.embed(tokens))
        if self.cfg.attention:
            x = torch.cat([x, self._attend(st["h"], st)], 1)
        new = dict(st)
        if self.cfg.rnn == "rnn":
            pre = self.W_hx(x) + self.W_hh(st["h"]) + st["bv"]
            h = torch.relu(pre)
            new["h"] = h
            new["bv"] = torch.zeros_like(st["bv"])  # the image enters at t=1 only
        else:
            h, c = self._lstm_step(x, st["h"], st["c"])
            new["h"], new["c"] = h, c
        return h, new

    def step(self, tokens: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        """One word: ``tokens`` ``[B]`` -> log-probabilities ``[B, V]`` and the next state."""
        h, st = self._core(tokens, st)
        return torch.log_softmax(self.out(self.drop(h)).float(), dim=-1), st

    # ------------------------------------------------------------------ training

    def forward(self, feats: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: ``inputs`` ``[B, T]`` starts with ``<start>``; returns logits ``[B, T, V]``,
        or ``[N, V]`` for the positions where the boolean ``select`` ``[B, T]`` is True (cheaper).
        ``rows`` ``[B]``: sentence b reads image ``rows[b]`` of ``feats`` (each image featurised once)."""
        st = self.init_state(feats, mask)
        if rows is not None:
            st = reorder_state(st, rows)
        if self.cfg.rnn == "lstm" and not self.cfg.attention:
            x = self.drop(self.embed(inputs))
            hs, _ = self.lstm(x, (st["h"][None].contiguous(), st["c"][None].contiguous()))
        elif self.cfg.rnn == "rnn" and not self.cfg.attention:
            u = self.W_hx(self.drop(self.embed(inputs)))  # all input projections at once
            h, out = st["h"], []
            for t in range(inputs.shape[1]):
                h = torch.relu(u[:, t] + self.W_hh(h) + (st["bv"] if t == 0 else 0))
                out.append(h)
            hs = torch.stack(out, 1)
        else:
            out = []
            for t in range(inputs.shape[1]):
                h, st = self._core(inputs[:, t], st)
                out.append(h)
            hs = torch.stack(out, 1)
        if select is not None:
            hs = hs[select]
        return self.out(self.drop(hs))


class UpDownModel(nn.Module):
    """Top-down attention captioner (Anderson et al. 2018, "Up-Down"), same interface as CaptionModel.

    ``feats`` ``[B, R, D]``: row 0 the whole image (its global feature), then the regions; every
    row is attended over. The attention LSTM's input projections of the word and of the global
    feature are computed outside the time loop (same maths as an ``LSTMCell`` on the concatenation).
    """

    def __init__(self, cfg: MRNNConfig):
        super().__init__()
        self.cfg = cfg
        V, E, H, D, A = cfg.vocab_size, cfg.embed, cfg.hidden, cfg.feat_dim, cfg.att_dim
        self.register_buffer("feat_mean", torch.zeros(D))
        self.register_buffer("feat_std", torch.ones(D))
        self.embed = nn.Embedding(V, E, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(D, H)  # global feature
        self.att_embed = nn.Linear(D, H)  # region features
        self.ctx2att = nn.Linear(H, A)
        self.h2att = nn.Linear(H, A)
        self.alpha = nn.Linear(A, 1)
        # attention LSTM: gates = W_x x + W_g g + W_h [h_lang, h_att]
        self.att_x = nn.Linear(E, 4 * H)
        self.att_g = nn.Linear(H, 4 * H, bias=False)
        self.att_h = nn.Linear(2 * H, 4 * H, bias=False)
        self.lang = nn.LSTMCell(2 * H, H)
        self.out = nn.Linear(H, V)

    normalise = CaptionModel.normalise

    def init_state(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        if feats.dim() == 2:
            feats = feats[:, None]
        if mask is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        feats = self.normalise(feats.float())
        regions = self.drop(torch.relu(self.att_embed(feats)))  # [B, R, H]
        g = self.drop(torch.relu(self.fc(feats[:, 0])))
        z = feats.new_zeros(feats.shape[0], self.cfg.hidden)
        return {"regions": regions, "att_keys": self.ctx2att(regions), "mask": mask, "g": self.att_g(g),
                "h_att": z, "c_att": z, "h": z, "c": z}

    def _attend(self, h: torch.Tensor, st: dict) -> torch.Tensor:
        e = self.alpha(torch.tanh(st["att_keys"] + self.h2att(h)[:, None])).squeeze(-1)  # [B, R]
        e = e.masked_fill(~st["mask"], float("-inf"))
        return torch.bmm(torch.softmax(e, dim=1)[:, None], st["regions"]).squeeze(1)

    def _core_x(self, gx: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        """One step from the word's attention-LSTM input projection ``gx`` ``[B, 4H]``."""
        gates = (gx + st["g"] + self.att_h(torch.cat([st["h"], st["h_att"]], 1))).float()  # cell in float32
        i, f, gg, o = gates.chunk(4, 1)
        c_att = torch.sigmoid(f) * st["c_att"] + torch.sigmoid(i) * torch.tanh(gg)
        h_att = torch.sigmoid(o) * torch.tanh(c_att)
        ctx = self._attend(h_att, st)
        h, c = self.lang(torch.cat([ctx, h_att], 1), (st["h"], st["c"]))
        new = dict(st)
        new.update(h_att=h_att, c_att=c_att, h=h, c=c)
        return h, new

    def _core(self, tokens: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        return self._core_x(self.att_x(self.drop(self.embed(tokens))), st)

    step = CaptionModel.step

    def forward(self, feats: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        st = self.init_state(feats, mask)
        if rows is not None:
            st = reorder_state(st, rows)
        gx = self.att_x(self.drop(self.embed(inputs)))  # [B, T, 4H], all steps at once
        T = inputs.shape[1]
        # one [B, 4H] tensor per step (unbind): slicing step t out of gx would cost, in the backward pass, a zero
        # [B, T, 4H] tensor per step (7.6% of a cross-entropy step on a CPU); unbind's backward is one stack
        if select is None:
            out = []
            for t, gx_t in enumerate(gx.unbind(1)):
                h, st = self._core_x(gx_t, st)
                out.append(h)
            return self.out(self.drop(torch.stack(out, 1)))
        # ``select`` marks a prefix of each row: run step t only for the rows still going (longest
        # first, as packed sequences), then put the outputs back in ``hs[select]`` (row-major) order
        lengths = select.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        st = reorder_state(st, order)
        steps, lengths = gx[order].unbind(1), lengths[order]
        out, where = [], []
        for t in range(T):
            n = int((lengths > t).sum())
            if n == 0:
                break
            st = {k: v[:n] for k, v in st.items()}
            h, st = self._core_x(steps[t][:n], st)
            out.append(h)
            where.append(order[:n] * T + t)
        hs = torch.cat(out)[torch.argsort(torch.cat(where))]
        return self.out(self.drop(hs))


def autocast(device: torch.device, enabled: bool = True):
    """bfloat16 autocast for training on ``device`` when ``enabled`` and it is a CUDA device; a no-op context
    on CPUs. (On a 2-core CPU with AMX bfloat16 units the Up-Down steps ran 23% (cross-entropy) and 19% (SCST)
    slower under CPU autocast than in float32: at ~100-row batches the casts cost more than the faster
    matrix products gain.)"""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def reorder_state(st: dict, index: torch.Tensor) -> dict:
    """Select / repeat batch rows of a state (beam search)."""
    return {k: v.index_select(0, index) for k, v in st.items()}


def build_model(cfg: MRNNConfig) -> nn.Module:
    """Factory (open_clip style): the paper's RNN / LSTM (:class:`CaptionModel`) or :class:`UpDownModel`."""
    if cfg.rnn == "updown":
        return UpDownModel(cfg)
    return CaptionModel(cfg)


def _field_ok(v, default) -> bool:
    """Is ``v`` a value of the type of the config field whose default is ``default``? (A field without a plain
    default, or defaulting to None, takes any value.)"""
    import dataclasses

    from vsa.io import is_number

    if default is None or default is dataclasses.MISSING:
        return True
    if isinstance(default, bool):
        return isinstance(v, bool)
    if isinstance(default, int):
        return isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, float):
        return is_number(v)
    return isinstance(v, type(default))


def _typed_config(cls, d: dict, path, part: str):
    """``cls`` from a checkpoint's ``part`` dict (unknown keys ignored); a value of the wrong type is a VsaError."""
    import dataclasses

    from vsa.checkpoint import config_from
    from vsa.errors import VsaError

    cfg = config_from(cls, d)
    for f in dataclasses.fields(cls):
        v = getattr(cfg, f.name)
        if not _field_ok(v, f.default):
            want = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
                type(f.default), type(f.default).__name__)
            raise VsaError(f"'{part}' {f.name} must be {want}, got {v!r:.60}", path)
    return cfg


def check_generator_config(cfg: MRNNConfig, path=None) -> None:
    """A one-line VsaError (naming ``path``) for a generator config no model can be built from."""
    from vsa.errors import VsaError

    if cfg.rnn not in RNNS:
        raise VsaError(f"'model' rnn must be one of {', '.join(RNNS)}, got {cfg.rnn!r:.60}", path)
    for name in ("feat_dim", "embed", "hidden", "att_dim", "max_regions"):
        if getattr(cfg, name) < 1:
            raise VsaError(f"'model' {name} must be at least 1, got {getattr(cfg, name)}", path)
    if cfg.vocab_size < 5:
        raise VsaError(f"'model' vocab_size must be at least 5 (4 special tokens and a word), got {cfg.vocab_size}", path)
    if cfg.cells < 0:
        raise VsaError(f"'model' cells must be at least 0, got {cfg.cells}", path)
    if not 0 <= cfg.dropout < 1:
        raise VsaError(f"'model' dropout must be at least 0 and below 1, got {cfg.dropout}", path)


def _fit_weights(model: nn.Module, sd: dict, path) -> None:
    """Check that ``sd`` holds exactly ``model``'s tensors, shape for shape; a one-line VsaError naming the first
    missing, unexpected or misshapen ones otherwise."""
    from vsa.errors import VsaError

    from vsa.checkpoint import weight_problems

    problems = weight_problems(model.state_dict(), sd, "the model's")
    if problems:
        raise VsaError(f"checkpoint weights do not fit its model config: {problems}", path)


def model_from_checkpoint(ckpt: dict, device: str = "cpu", path=None) -> nn.Module:
    """Rebuild a model from a loaded ``mrnn`` checkpoint (weights cast to float32); its decoding defaults
    are ``model.decoding`` (:class:`vsa.decoding.DecodingConfig`). A checkpoint whose config, decoding defaults,
    vocabulary or weights do not make a model is a one-line VsaError naming ``path`` (its file) and what is wrong."""
    from vsa.data import Vocab
    from vsa.decoding import DecodingConfig
    from vsa.errors import VsaError

    cfg = _typed_config(MRNNConfig, ckpt["model"], path, "model")
    check_generator_config(cfg, path)
    dec = _typed_config(DecodingConfig, ckpt.get("decoding") or {}, path, "decoding")
    if dec.beam < 1 or dec.max_len < 1:
        raise VsaError(f"'decoding' beam and max_len must be at least 1, got {dec.beam} and {dec.max_len}", path)
    if not 0 <= dec.mirror < 1:
        raise VsaError(f"'decoding' mirror must be at least 0 and below 1, got {dec.mirror}", path)
    n_words = len(Vocab(ckpt["vocab"]))
    if n_words != cfg.vocab_size:
        raise VsaError(f"the vocabulary has {n_words} entries (with the special tokens) but the model config "
                       f"{cfg.vocab_size}", path)
    dim = (ckpt.get("extractor") or {}).get("dim")
    if isinstance(dim, int) and not isinstance(dim, bool) and dim != cfg.feat_dim:
        raise VsaError(f"the extractor makes {dim}-dim features but the model config reads {cfg.feat_dim}", path)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    with torch.device("meta"):  # the shapes alone: a config of absurd sizes allocates nothing before it is refused
        _fit_weights(build_model(cfg), sd, path)
    model = build_model(cfg)
    model.load_state_dict(sd)
    model.decoding = dec
    return model.to(device).eval()


class GeneratorEnsemble(nn.Module):
    """Several generators decoded as one (as ImageCaptioning.pytorch's ``eval_ensemble``): each step's
    distribution is the ``weights``-weighted mean of the members' word probabilities. It has a model's
    decoding interface (``init_state`` / ``step``, ``cfg``, ``decoding``: the first member's), so greedy and
    beam search take it as they take one model. The members must share the vocabulary and read the same
    features (one extractor record, all whole-image or all region/grid models): :func:`load_generators`
    checks that. ``slices``: members on different backbones (``vsa eval`` only): the input is their features side by
    side along the last axis and member i reads ``feats[..., a:b]`` of its ``(a, b)``."""

    def __init__(self, members: list, weights: list[float] | None = None, slices: list[tuple[int, int]] | None = None):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two generators")
        w = torch.tensor(weights if weights is not None else [1.0] * len(members), dtype=torch.float32)
        if len(w) != len(members) or bool((w < 0).any()) or not bool((w > 0).any()):
            raise ValueError(f"need {len(members)} non-negative weights, not all zero, got {list(w.tolist())}")
        self.members = nn.ModuleList(members)
        if slices is not None and len(slices) != len(members):
            raise ValueError(f"{len(slices)} feature slices for {len(members)} generators")
        self.slices = slices
        # the members reading each block of the input, in order (one block: all read the same features)
        keys = slices or [None] * len(members)
        self.blocks = [[i for i, k in enumerate(keys) if k == b] for b in dict.fromkeys(keys)]
        self.register_buffer("log_w", torch.log(w / w.sum()))
        self.cfg = members[0].cfg
        from vsa.decoding import DecodingConfig

        self.decoding = getattr(members[0], "decoding", None) or DecodingConfig()

    def init_state(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        def own(i):
            return feats if self.slices is None else feats[..., self.slices[i][0] : self.slices[i][1]]

        return {f"{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.init_state(own(i), mask).items()}

    def step(self, tokens: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        logps, new = [], {}
        for i, m in enumerate(self.members):
            pre = f"{i}."
            lp, s = m.step(tokens, {k[len(pre):]: v for k, v in st.items() if k.startswith(pre)})
            logps.append(lp)
            new.update({pre + k: v for k, v in s.items()})
        mixed = torch.logsumexp(torch.stack(logps) + self.log_w.to(logps[0].dtype)[:, None, None], 0)
        return mixed, new


def with_mirror(model, weight: float):
    """``model`` decoding a photo and its left-right mirror as one (test-time augmentation, ``decoding.mirror``):
    a :class:`GeneratorEnsemble` of the model with itself, weights ``1 - weight`` : ``weight``, whose input is the
    photo's features and the mirror image's side by side along the last axis (``torch.cat([f, f_mirror], -1)``);
    ``model`` itself when ``weight`` is 0. ``model`` may be an ensemble (members on one backbone)."""
    from vsa.decoding import mirror_weight
    from vsa.errors import VsaError

    weight = mirror_weight(weight)
    if not weight:
        return model
    if getattr(model, "slices", None) is not None:
        raise VsaError("mirror decoding of an ensemble across backbones is not supported: pass --mirror 0")
    d = model.cfg.feat_dim
    return GeneratorEnsemble([model, model], [1 - weight, weight], [(0, d), (d, 2 * d)]).eval()


def backbone(extractor: dict | None) -> tuple:
    """What makes two generators' features the same file: the extractor record's CNN, input and normalisation."""
    return tuple(str((extractor or {}).get(k)) for k in ("extractor", "input", "resize", "mean", "std"))


def load_generators(paths, device: str = "cpu", weights: list[float] | None = None, mixed_backbones: bool = False):
    """``(model, checkpoint)`` of one generator checkpoint, or of several as a :class:`GeneratorEnsemble` (the
    checkpoint: the first member's, which gives the vocabulary and the features to make). Members that differ in
    vocabulary, extractor or kind of input are refused with the member's path. ``mixed_backbones``: members may
    come from different CNNs (same crop and layout); the ensemble then reads their features side by side, one
    block per backbone in order of first appearance (``model.blocks``: the member indices of each block), as
    :func:`vsa.eval_caption.generate_split` builds them."""
    from itertools import accumulate

    from vsa.checkpoint import load_checkpoint
    from vsa.errors import VsaError

    paths = [paths] if not isinstance(paths, (list, tuple)) else list(paths)
    cks = [load_checkpoint(p, "mrnn") for p in paths]
    if weights is not None and len(weights) != len(paths):
        raise VsaError(f"{len(weights)} weights for {len(paths)} generators")
    models = [model_from_checkpoint(ck, device, p) for p, ck in zip(paths, cks)]
    if len(models) == 1:
        return models[0], cks[0]
    first = cks[0]
    dims: dict = {}  # backbone -> its feature size: members on one backbone read the same features
    ex0 = first.get("extractor") or {}
    for p, ck, m in zip(paths, cks, models):
        if list(ck["vocab"]) != list(first["vocab"]):
            raise VsaError("the ensemble's generators have different vocabularies", p)
        ex = ck.get("extractor") or {}
        for key in ("crop", "grid"):
            if ex0.get(key) != ex.get(key):
                raise VsaError(f"the ensemble's generators read different features ({key}: {ex.get(key)!r} vs "
                               f"{ex0.get(key)!r})", p)
        if not mixed_backbones and backbone(ex) != backbone(ex0):
            raise VsaError(f"the ensemble's generators read different features (CNN: {backbone(ex)} vs "
                           f"{backbone(ex0)})", p)
        c0 = models[0].cfg
        d = dims.setdefault(backbone(ex), m.cfg.feat_dim)
        if (uses_regions(m.cfg), region_rows(m.cfg), m.cfg.feat_dim) != (uses_regions(c0), region_rows(c0), d):
            raise VsaError("the ensemble's generators read different inputs (whole image vs regions, feature size or "
                           "regions per image)", p)
    starts = dict(zip(dims, accumulate([0, *dims.values()])))
    slices = [(starts[b], starts[b] + dims[b]) for b in (backbone(ck.get("extractor")) for ck in cks)]
    return GeneratorEnsemble(models, weights, slices if len(dims) > 1 else None).to(device).eval(), first


def export_generator(src, dst, half: bool = True, decoding: list[str] | None = None) -> dict:
    """Write a compact inference copy of a trained generator (float16 weights, no optimiser state): how
    ``vsa/assets/mrnn-flickr8k.pt`` and ``mrnn-regions-flickr8k.pt`` are made (``python -m vsa.mrnn SRC DST
    [FIELD=VALUE ...]``; ``decoding``: ``FIELD=VALUE`` strings of :class:`vsa.decoding.DecodingConfig` chosen on
    val, replacing the trained file's)."""
    from vsa.checkpoint import apply_overrides, export_checkpoint
    from vsa.decoding import DecodingConfig

    items = list(decoding or [])
    dec = apply_overrides(DecodingConfig(), items, "decoding")
    given = {item.partition("=")[0].strip().replace("-", "_") for item in items}
    keep = ("dataset", "mode", "epoch", "phase", "history", "best", "decoding_search", "seconds")
    return export_checkpoint(src, dst, "mrnn", keep, half, decoding={k: getattr(dec, k) for k in given})


if __name__ == "__main__":  # python -m vsa.mrnn SRC DST [FIELD=VALUE ...]
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python -m vsa.mrnn TRAINED.pt OUT.pt [DECODING_FIELD=VALUE ...]  (e.g. beam=5 mirror=0.5)")
    info = export_generator(sys.argv[1], sys.argv[2], decoding=sys.argv[3:])
    print({k: v for k, v in info.items() if k not in ("history", "decoding_search")})
