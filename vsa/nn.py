"""Small neural-network building blocks shared by the models (plain functions and modules over torch)."""

from __future__ import annotations

import torch
from torch import nn


class Standardize(nn.Module):
    """Standardise CNN features with the training set's per-dimension mean and std (saved with the model).

    Pooled CNN features are all positive with a large common component; centring them lets the
    projection separate images from the first steps instead of first unlearning that mean.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_moments(self, mean, std) -> None:
        """Per-dimension mean and std of the training regions (:meth:`vsa.features.store.RegionBank.moments`)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype).clamp(min=1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn by ``torch.rand`` on the CPU: PyTorch's CPU dropout draws it with
    ``bernoulli_``, about twice as slow, and the region features' dropout alone took a tenth of a training step
    on two cores. The same distribution (keep with probability ``1 - p``, scaled by ``1 / (1 - p)``), another
    random stream; on other devices the fused kernel as before. No parameters: checkpoints are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1:
            return x * 0
        keep = (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep


def additive_attention(keys: torch.Tensor, query: torch.Tensor, score: nn.Linear, values: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """Additive (Bahdanau) attention: the mean of ``values`` ``[B, R, Dv]`` weighted by
    ``softmax_r(score(tanh(keys[:, r] + query)))`` over the rows ``mask`` ``[B, R]`` keeps (True = real row).

    ``keys`` ``[B, R, A]``: the rows projected once per image (they do not change from word to word); ``query``
    ``[B, A]``: the decoder state projected at this step; ``score``: a ``Linear(A, 1)``. The layers stay with the
    model that owns them, under its names (as its checkpoints store them). Returns ``[B, Dv]``."""
    e = score(torch.tanh(keys + query[:, None])).squeeze(-1)  # [B, R]
    e = e.masked_fill(~mask, float("-inf"))
    return torch.bmm(torch.softmax(e, dim=1)[:, None], values).squeeze(1)
