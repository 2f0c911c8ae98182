"""Top-down attention captioner (Anderson et al. 2018, "Up-Down").

An attention LSTM reads the previous language state, the global (whole-image) feature and the word; its state
attends over the regions (the grid cells of ``vsa embed --crop grid`` or detector boxes); a language LSTM reads the
attended feature and the attention state and predicts the word.
"""

from __future__ import annotations

import torch
from torch import nn

from vsa.generator.models.base import CaptionModelBase, register_caption_model, reorder_state
from vsa.nn import additive_attention


@register_caption_model("updown")
class UpDown(CaptionModelBase):
    """``feats`` ``[B, R, D]``: row 0 the whole image (its global feature), then the regions; every row is attended
    over. The attention LSTM's input projections of the word and of the global feature are computed outside the
    time loop (same maths as an ``LSTMCell`` on the concatenation)."""

    summary = "top-down attention over grid cells or regions"

    def __init__(self, cfg):
        super().__init__(cfg)
        V, E, H, D, A = cfg.vocab_size, cfg.embed, cfg.hidden, cfg.feat_dim, cfg.att_dim
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

    @classmethod
    def reads_regions(cls, cfg) -> bool:
        return True

    @classmethod
    def features_key(cls, cfg) -> str:
        return "features.grid"

    def init_state(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        feats, mask = self.prepare(feats, mask)
        regions = self.drop(torch.relu(self.att_embed(feats)))  # [B, R, H]
        g = self.drop(torch.relu(self.fc(feats[:, 0])))
        z = feats.new_zeros(feats.shape[0], self.cfg.hidden)
        return {"regions": regions, "att_keys": self.ctx2att(regions), "mask": mask, "g": self.att_g(g),
                "h_att": z, "c_att": z, "h": z, "c": z}

    def _core_x(self, gx: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        """One step from the word's attention-LSTM input projection ``gx`` ``[B, 4H]``."""
        gates = (gx + st["g"] + self.att_h(torch.cat([st["h"], st["h_att"]], 1))).float()  # cell in float32
        i, f, gg, o = gates.chunk(4, 1)
        c_att = torch.sigmoid(f) * st["c_att"] + torch.sigmoid(i) * torch.tanh(gg)
        h_att = torch.sigmoid(o) * torch.tanh(c_att)
        ctx = additive_attention(st["att_keys"], self.h2att(h_att), self.alpha, st["regions"], st["mask"])
        h, c = self.lang(torch.cat([ctx, h_att], 1), (st["h"], st["c"]))
        new = dict(st)
        new.update(h_att=h_att, c_att=c_att, h=h, c=c)
        return h, new

    def logits(self, tokens: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        h, st = self._core_x(self.att_x(self.drop(self.embed(tokens))), st)
        return self.out(self.drop(h)), st

    def forward(self, feats: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.drop(self.hidden(feats, inputs, mask, select, rows)[0]))

    def hidden(self, feats: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None,
               select: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The teacher-forced language states: ``[B, T, H]``, or ``[N, H]`` at the ``select`` positions (row-major),
        and the sentences' first state (:meth:`sentence_states`)."""
        st = first = self.sentence_states(feats, mask, rows)
        gx = self.att_x(self.drop(self.embed(inputs)))  # [B, T, 4H], all steps at once
        T = inputs.shape[1]
        # one [B, 4H] tensor per step (unbind): slicing step t out of gx would cost, in the backward pass, a zero
        # [B, T, 4H] tensor per step; unbind's backward is one stack
        if select is None:
            out = []
            for gx_t in gx.unbind(1):
                h, st = self._core_x(gx_t, st)
                out.append(h)
            return torch.stack(out, 1), first
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
        return torch.cat(out)[torch.argsort(torch.cat(where))], first
