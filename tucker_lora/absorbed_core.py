"""`absorb_core`: matrix adapters trained as `dW = K V^T` between cycle events, with `K = U C` and the core fixed at I.

Under Adam every trained entry moves by about the learning rate per step. With `U C V^T` stepped as three factors
from a zero core, `dW` grows through the `r^2` core entries, and the bases' steps move `dW` only in proportion to
`C`: the update starts much slower than LoRA's `B A`, whose `n r` entries of `B` all move from the first step.
Folding the core into the output basis after every cycle event (`U <- U C`, `C <- I`) makes the optimizer step
`K = U C` and `V` (the coefficients of GeoLoRA's K- and L-steps), exactly as it steps LoRA's `B` and `A`; each
event then retracts (`K = Q R`, so `C = R ...`), augments or truncates as in the Tucker form, and folds again.

Only adapters whose core is a matrix (linear layers) take this form: a conv's core has its kernel modes, which no
basis can absorb, so convs keep the Tucker form. The storage keeps its shapes; in the folded form the out-mode rank
equals the in-mode rank (`K` has one column per input direction) and the core's active block is the identity.
"""

from __future__ import annotations

from typing import Any

import torch

from .batched_cycle import LayerBatch, set_ranks


def folds(config: Any, core: torch.Tensor) -> bool:
    """Whether an adapter with this config and core (at capacity) is kept folded: `absorb_core` on a matrix core
    whose out-mode capacity holds every in-mode column (a 2-output head adapted at rank 8 cannot fold)."""
    return bool(getattr(config, "absorb_core", False)) and core.dim() == 2 and core.shape[0] >= core.shape[1]


@torch.no_grad()
def fold_tensors(core: torch.Tensor, out_basis: torch.Tensor, ranks: list[int]) -> list[int]:
    """Folds one layer's core into its output basis in place: `U[:, :r_in] <- U[:, :r_out] C[:r_out, :r_in]`,
    `C[:r_in, :r_in] <- I`, everything else zero. Returns the new ranks `[r_in, r_in]`; `dW` is unchanged."""
    r_out, r_in = ranks
    folded = out_basis[:, :r_out].double() @ core[:r_out, :r_in].double().to(out_basis.device)
    out_basis.zero_()
    out_basis[:, :r_in] = folded.to(out_basis.dtype)
    core.zero_()
    core[:r_in, :r_in] = torch.eye(r_in, dtype=core.dtype, device=core.device)
    return [r_in, r_in]


@torch.no_grad()
def fold(batch: LayerBatch) -> None:
    """`fold_tensors` for every layer of a batch of matrix adapters: one stacked product, one write per tensor."""
    ranks = batch.ranks()
    w_out, w_in = max(r[0] for r in ranks), max(r[1] for r in ranks)
    core = torch.stack([c.data for c in batch.cores])[:, :w_out, :w_in]
    out_basis = torch.stack([b[0].data for b in batch.bases])[..., :w_out]
    compute = torch.float64 if out_basis.device.type == "cpu" else torch.float32
    folded = out_basis.to(compute) @ core.to(device=out_basis.device, dtype=compute)  # (L, n, w_in)
    in_ranks = [r[1] for r in ranks]
    mask = torch.arange(w_in, device=folded.device) < torch.tensor(in_ranks, device=folded.device)[:, None]
    folded = folded * mask[:, None, :]
    batch.write_basis(0, folded)
    eye = torch.diag_embed(mask.to(compute))
    batch.write_core(eye)
    set_ranks(batch, [[r, r] for r in in_ranks])


@torch.no_grad()
def keep_in_bases(folded: list[Any], name: str, ratio: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(V's active columns, a copy of them)` for every folded layer, taken before `optimizer.step()`, for
    `scale_in_basis_steps`; empty when `ratio` (`in_basis_lr_ratio`) is 1 (the optimizer's own steps stand). Only the
    active columns: the others stay zero (no gradient, zero weight decay), so their step is zero at any ratio."""
    if ratio == 1.0:
        return []
    kept = []
    for layer in folded:
        active = layer.tucker_bases[name][1][:, : layer.active_ranks(name)[1]]
        kept.append((active, active.clone()))
    return kept


@torch.no_grad()
def scale_in_basis_steps(kept: list[tuple[torch.Tensor, torch.Tensor]], ratio: float) -> None:
    """Makes the step the optimizer just took on each folded `V` `ratio` times as long: for AdamW and SGD the step
    of a learning rate `lr * ratio` for `V` (their updates, weight decay included, are linear in the rate)."""
    for active, before in kept:
        active.mul_(ratio).add_(before, alpha=1.0 - ratio)  # in place (a view of V): before + ratio * (after - before)
