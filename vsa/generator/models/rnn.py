"""The paper's multimodal RNN (Sec. 3.2) and neuraltalk2's LSTM, each optionally attending over region features.

Paper RNN (``arch="rnn"``)::

    b_v = W_hi CNN(I)
    h_t = relu(W_hx x_t + W_hh h_{t-1} + b_h + 1(t=1) * b_v)
    y_t = softmax(W_oh h_t + b_o)

with x_1 the ``<start>`` embedding and ``<end>`` closing the sentence.

LSTM (``arch="lstm"``, neuraltalk2 style): the projected image is the LSTM's input at step 0, then ``<start>`` and
the words.

With ``attention=True`` each step of either also reads a soft-attention mix of the image's region features (whole
image + detector boxes, Show-Attend-Tell style); with one region per image it reduces to the plain model.
"""

from __future__ import annotations

import torch
from torch import nn

from vsa.generator.models.base import CaptionModelBase, register_caption_model
from vsa.nn import additive_attention


class _Recurrent(CaptionModelBase):
    """What the two share: the word embedding, attention over the regions (``cfg.attention``) and the teacher-forced
    pass. A subclass builds its recurrent layers, then the output layer ``out``, and gives ``_start`` (its state
    from the whole image), ``_recur`` (one step from the step's input) and ``_unrolled`` (all steps of a model
    without attention at once)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        D, E, H = cfg.feat_dim, cfg.embed, cfg.hidden
        self.embed = nn.Embedding(cfg.vocab_size, E, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.attention:
            self.att_feat = nn.Linear(D, cfg.att_dim)
            self.att_h = nn.Linear(H, cfg.att_dim, bias=False)
            self.att_v = nn.Linear(cfg.att_dim, 1)
        self.step_input = E + (D if cfg.attention else 0)  # a step reads the word (and the attended regions)

    @classmethod
    def reads_regions(cls, cfg) -> bool:
        return bool(cfg.attention)

    def _attend(self, h: torch.Tensor, st: dict) -> torch.Tensor:
        return additive_attention(st["att_keys"], self.att_h(h), self.att_v, st["regions"], st["mask"])

    def init_state(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        feats, mask = self.prepare(feats, mask)
        st: dict = {}
        if self.cfg.attention:
            st["regions"] = feats
            st["att_keys"] = self.att_feat(feats)
            st["mask"] = mask
        return self._start(feats[:, 0], st)

    def _input(self, tokens: torch.Tensor, st: dict) -> torch.Tensor:
        x = self.drop(self.embed(tokens))
        if self.cfg.attention:
            x = torch.cat([x, self._attend(st["h"], st)], 1)
        return x

    def logits(self, tokens: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        h, st = self._recur(self._input(tokens, st), st)
        return self.out(self.drop(h)), st

    def forward(self, feats: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        st = self.sentence_states(feats, mask, rows)
        if self.cfg.attention:  # each step attends with the state before it: one step at a time
            out = []
            for t in range(inputs.shape[1]):
                h, st = self._recur(self._input(inputs[:, t], st), st)
                out.append(h)
            hs = torch.stack(out, 1)
        else:
            hs = self._unrolled(self.drop(self.embed(inputs)), st)
        if select is not None:
            hs = hs[select]  # the output layer only where a word is scored (cheaper)
        return self.out(self.drop(hs))


@register_caption_model("rnn")
class MultimodalRNN(_Recurrent):
    """The paper's multimodal RNN: a ReLU RNN that sees the image at its first step."""

    summary = "the paper's multimodal RNN"

    def __init__(self, cfg):
        super().__init__(cfg)
        H = cfg.hidden
        self.W_hx = nn.Linear(self.step_input, H)  # bias is b_h
        self.W_hh = nn.Linear(H, H, bias=False)
        self.W_hi = nn.Linear(cfg.feat_dim, H)  # b_v = W_hi CNN(I)
        self.out = nn.Linear(H, cfg.vocab_size)  # W_oh, b_o

    def _start(self, glob: torch.Tensor, st: dict) -> dict:
        st["h"] = glob.new_zeros(glob.shape[0], self.cfg.hidden)
        st["bv"] = self.W_hi(self.drop(glob))
        return st

    def _recur(self, x: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        h = torch.relu(self.W_hx(x) + self.W_hh(st["h"]) + st["bv"])
        new = dict(st)
        new["h"] = h
        new["bv"] = torch.zeros_like(st["bv"])  # the image enters at t=1 only
        return h, new

    def _unrolled(self, x: torch.Tensor, st: dict) -> torch.Tensor:
        u = self.W_hx(x)  # all input projections at once
        h, out = st["h"], []
        for t in range(x.shape[1]):
            h = torch.relu(u[:, t] + self.W_hh(h) + (st["bv"] if t == 0 else 0))
            out.append(h)
        return torch.stack(out, 1)


@register_caption_model("lstm")
class LSTMCaptioner(_Recurrent):
    """neuraltalk2's LSTM: the projected image is its input at step 0, then ``<start>`` and the words."""

    summary = "neuraltalk2's LSTM, the image as its first input"

    def __init__(self, cfg):
        super().__init__(cfg)
        E, H = cfg.embed, cfg.hidden
        self.img = nn.Linear(cfg.feat_dim, E)
        if cfg.attention:
            self.cell = nn.LSTMCell(self.step_input, H)
        else:  # fused: teacher forcing runs all steps in one call
            self.lstm = nn.LSTM(E, H, batch_first=True)
        self.out = nn.Linear(H, cfg.vocab_size)

    def _cell(self, x, h, c):
        if self.cfg.attention:
            return self.cell(x, (h, c))
        _, (h, c) = self.lstm(x[:, None], (h[None].contiguous(), c[None].contiguous()))
        return h[0], c[0]

    def _start(self, glob: torch.Tensor, st: dict) -> dict:
        z = glob.new_zeros(glob.shape[0], self.cfg.hidden)
        x = self.drop(self.img(self.drop(glob)))
        if self.cfg.attention:
            x = torch.cat([x, self._attend(z, st)], 1)
        st["h"], st["c"] = self._cell(x, z, z)
        return st

    def _recur(self, x: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        h, c = self._cell(x, st["h"], st["c"])
        new = dict(st)
        new["h"], new["c"] = h, c
        return h, new

    def _unrolled(self, x: torch.Tensor, st: dict) -> torch.Tensor:
        hs, _ = self.lstm(x, (st["h"][None].contiguous(), st["c"][None].contiguous()))
        return hs
