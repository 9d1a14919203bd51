"""Structured pruning of MLP channels, scored on calibration activations.

A channel j of an MLP (row j of the up/gate projections, column j of the down projection) is removed
physically, so the remaining layers are smaller dense Linears that every dense kernel runs faster.
Score: the output energy the channel carries on calibration text, E[h_j²]·‖W_down[:, j]‖² (channels
with large weights but idle activations go first, unlike a weight-norm score, which was measured to
break SmolLM2). Optionally the down projection is refit by least squares on the calibration Gram
matrix G = HᵀH so the kept channels absorb what the removed ones contributed:
W'_k = W_k + W_r·G[r, k]·(G[k, k] + λI)⁻¹ — the ridge shrinks the correction toward plain slicing, not
the weights toward zero (a few thousand calibration tokens barely outnumber the channels).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CHANNEL_ALIGN = 64
"""Kept widths are multiples of this: aligned GEMMs are faster and the CPU int8 kernel requires it."""
RIDGE = 1.0
"""Ridge term of the refit relative to the mean diagonal of G[k, k]: the most faithful of the values measured
(load_tests/results/compression/README.md#decisions)."""


def kept_width(width: int, ratio: float) -> int:
    """Channels kept when pruning ``ratio`` of ``width``, rounded down to CHANNEL_ALIGN (at least one block)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return width
    return max(CHANNEL_ALIGN, int(width * (1.0 - ratio)) // CHANNEL_ALIGN * CHANNEL_ALIGN)


def channel_scores(down: nn.Linear, gram: Tensor) -> Tensor:
    w = down.weight.detach().float()
    return gram.diagonal().float().to(w.device) * w.pow(2).sum(dim=0)


@torch.no_grad()
def prune_mlp(
    ups: list[nn.Linear], down: nn.Linear, gram: Tensor, keep: int, reconstruct: bool, ridge: float = RIDGE
) -> tuple[list[nn.Linear], nn.Linear, Tensor]:
    """New (ups, down) keeping the ``keep`` highest-scoring intermediate channels, and their indices."""
    width = down.in_features
    if keep >= width:
        return ups, down, torch.arange(width)
    idx = channel_scores(down, gram).topk(keep).indices.sort().values
    new_ups = []
    for up in ups:
        lin = nn.Linear(up.in_features, keep, bias=up.bias is not None, device=up.weight.device, dtype=up.weight.dtype)
        lin.weight.copy_(up.weight[idx.to(up.weight.device)])
        if up.bias is not None:
            lin.bias.copy_(up.bias[idx.to(up.weight.device)])
        new_ups.append(lin)
    w = down.weight.detach()
    dev = w.device
    new_down = nn.Linear(keep, down.out_features, bias=down.bias is not None, device=dev, dtype=w.dtype)
    ik = idx.to(dev)
    new_down.weight.copy_(w[:, ik])
    if reconstruct:
        g = gram.to(device=dev, dtype=torch.float64)
        removed = torch.ones(width, dtype=torch.bool, device=dev)
        removed[ik] = False
        gkk = g[ik][:, ik]
        gkk = gkk + torch.eye(keep, device=dev, dtype=torch.float64) * (ridge * gkk.diagonal().mean())
        rhs = g[ik][:, removed] @ w[:, removed].double().T  # [keep, out] = G[k, r]·W_rᵀ
        new_down.weight.add_(torch.linalg.solve(gkk, rhs).T.to(w.dtype))
    if down.bias is not None:
        new_down.bias.copy_(down.bias)
    return new_ups, new_down, idx


def allocate_widths(downs: list[nn.Linear], grams: list[Tensor], ratio: float, allocation: str) -> list[int]:
    """Kept width per layer. ``uniform``: the same share everywhere. ``global``: each channel is scored
    relative to its layer's total output energy and the ``ratio`` lowest across all layers go, so layers
    whose channels all matter keep their width (rounded down to CHANNEL_ALIGN per layer)."""
    widths = [d.in_features for d in downs]
    if allocation == "uniform" or ratio == 0.0:
        return [kept_width(w, ratio) for w in widths]
    rel = [(s := channel_scores(d, g)) / s.sum().clamp(min=1e-12) for d, g in zip(downs, grams, strict=True)]
    pooled = torch.cat([r.cpu() for r in rel])
    n_remove = int(ratio * pooled.numel())
    if n_remove == 0:
        return widths
    threshold = pooled.kthvalue(n_remove).values
    return [
        max(CHANNEL_ALIGN, w - int((r.cpu() <= threshold).sum()) // CHANNEL_ALIGN * CHANNEL_ALIGN)
        for w, r in zip(widths, rel, strict=True)
    ]
