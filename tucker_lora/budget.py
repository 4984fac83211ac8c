"""The parameter budget (`param_budget`): one truncation's ranks chosen over all layers and modes of an adapter.

After the tolerance rule has given every mode its rank (an upper bound here), the budget rule removes singular
directions, one at a time, until the adapter's active parameters fit: each time the direction that loses the least
energy per parameter it frees, over every layer and mode of the adapter.

*Energy* is exact, not a bound. With the HOSVD rotations `P_i` of a core `C`, `G = C x_1 P_1^T ... x_d P_d^T` holds
the same entries in the rotated bases, and truncating to ranks `r` keeps exactly `G[:r_1, ..., :r_d]`, so
`||dW - dW_r||_F^2 = ||G||^2 - ||G[:r]||^2`. Removing index `r_i - 1` of mode i loses the energy of
that slab of the current block. Per-mode singular values alone would mislead: for a matrix core both modes have the
same singular values, but a direction cut from one mode makes the same direction of the other mode worthless (its
slab is then zero), which the slab energy sees and `sigma^2` does not.

Energies are absolute: the model adds `s * dW` with the same scaling `s = alpha / r` in every layer of an adapter, so
`||dW - dW_r||^2` is what the adapted model loses, comparable between layers. Normalizing by each core's norm would
give a weak layer as many parameters as a strong one. After the removals, directions are added back, best energy
per parameter first, while they fit, since the last removal may free more than was needed. Everything here is
deterministic (ties go to the earlier layer, then the earlier mode), on the CPU, in float64.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .rank_ops import Spectra
from .tucker_ops import mode_product


@dataclass
class BudgetLayer:
    """What the allocation needs to know of one adapted layer.

    Args:
        energies (`torch.Tensor`): `(w_0, ..., w_{d-1})`, float64: `G^2` of the layer's HOSVD core `G`, summed over
            the unfactored trailing modes (see `layer_energies`).
        sizes (`Sequence[int]`): `n_i`, the rows of each basis.
        unfactored (`int`): the product of the core's trailing, unfactored sizes (`kh * kw` for a channel-Tucker
            conv, 1 for a Linear).
        lower (`Sequence[int]`): the smallest rank per mode (`r_min`, clamped to the width).
        upper (`Sequence[int]`): the largest rank per mode (the tolerance rule's ranks).
    """

    energies: torch.Tensor
    sizes: Sequence[int]
    unfactored: int
    lower: Sequence[int]
    upper: Sequence[int]


def layer_energies(spectra: Spectra) -> torch.Tensor:
    """`G^2` of the HOSVD core `G = C x_1 P_1^T ... x_d P_d^T`, summed over the unfactored modes."""
    core = spectra.active
    for mode, rotation in enumerate(spectra.rotations):
        core = mode_product(core, rotation.T, mode)
    energies = core.square()
    n_modes = len(spectra.rotations)
    return energies.sum(dim=tuple(range(n_modes, energies.dim()))) if energies.dim() > n_modes else energies


def parameter_count(ranks: Sequence[int], sizes: Sequence[int], unfactored: int) -> int:
    """Active parameters of a layer at `ranks`: `prod(ranks) * unfactored` core entries + `sum n_i r_i` basis
    entries (the same count as `TuckerLayer.active_parameter_count`)."""
    return math.prod(ranks) * unfactored + sum(n * r for n, r in zip(sizes, ranks))


def lost_energy(layer: BudgetLayer, ranks: Sequence[int]) -> float:
    """The energy a truncation of `layer` to `ranks` discards: `||G||^2 - ||G[:r]||^2`."""
    block = tuple(slice(0, int(r)) for r in ranks)
    return float(layer.energies.sum() - layer.energies[block].sum())


def _kept(layer: BudgetLayer, ranks: Sequence[int]) -> float:
    return float(layer.energies[tuple(slice(0, int(r)) for r in ranks)].sum())


def _moves(n_modes: int) -> list[tuple[int, ...]]:
    """Every non-empty set of modes, in a fixed order (one mode first, then pairs, ...)."""
    return [s for size in range(1, n_modes + 1) for s in itertools.combinations(range(n_modes), size)]


def _best_move(layer: BudgetLayer, ranks: list[int], bound: Sequence[int], step: int, slack: float = math.inf):
    """The best way to move one index per mode of a set of modes by `step` (-1: remove, +1: add back), as
    `(energy per parameter, new ranks, parameter change)`; `None` if no set can move. Removal minimizes energy lost
    per parameter freed; adding back maximizes energy won per parameter spent, among those within `slack`. Sets of
    several modes count: cutting one direction from both modes of a matrix core costs the energy of one."""
    kept, count = _kept(layer, ranks), parameter_count(ranks, layer.sizes, layer.unfactored)
    best = None
    for modes in _moves(len(ranks)):
        if any((ranks[m] <= bound[m]) if step < 0 else (ranks[m] >= bound[m]) for m in modes):
            continue
        moved = [r + step if m in modes else r for m, r in enumerate(ranks)]
        change = abs(parameter_count(moved, layer.sizes, layer.unfactored) - count)
        if change > slack:
            continue
        score = abs(kept - _kept(layer, moved)) / change
        if step > 0 and score <= 0.0:
            continue  # a direction of zero energy is not worth its parameters
        if best is None or (score < best[0] if step < 0 else score > best[0]):
            best = (score, moved, change)
    return best


def allocate_ranks(layers: Sequence[BudgetLayer], budget: int) -> list[list[int]]:
    """Ranks within each layer's `[lower, upper]` whose total active parameters are at most `budget`, losing little
    energy (greedy on energy lost per parameter freed; see the module docstring).

    Args:
        layers (`Sequence[BudgetLayer]`): every layer of the adapter, in a fixed order (ties go to the earlier one).
        budget (`int`): the most active parameters the layers may keep together.

    Returns:
        `list[list[int]]`: the ranks per layer and mode; `upper` itself when it fits.

    Raises:
        `ValueError`: when the budget is below the layers' count at their lower bounds.

    Example:

    ```python
    ranks = allocate_ranks([BudgetLayer(energies, [768, 768], 1, [1, 1], [12, 11])], budget=10_000)
    ```
    """
    ranks = [[int(r) for r in layer.upper] for layer in layers]
    lower = [[min(int(lo), r) for lo, r in zip(layer.lower, upper)] for layer, upper in zip(layers, ranks)]
    total = sum(parameter_count(r, layer.sizes, layer.unfactored) for layer, r in zip(layers, ranks))
    if total <= budget:
        return ranks
    floor = sum(parameter_count(lo, layer.sizes, layer.unfactored) for layer, lo in zip(layers, lower))
    if floor > budget:
        raise ValueError(f"`param_budget` must be >= {floor} (every mode at r_min) for this adapter; got {budget}")
    moves = [_best_move(layer, r, lo, -1) for layer, r, lo in zip(layers, ranks, lower)]
    while total > budget:
        # the cheapest removal; of equal ones the earlier layer's
        li = min((i for i, move in enumerate(moves) if move is not None), key=lambda i: moves[i][0])
        _, ranks[li], freed = moves[li]
        total -= freed
        moves[li] = _best_move(layers[li], ranks[li], lower[li], -1)
    # the last removal may have freed more than needed: add back what fits, best energy per parameter first
    slack = budget - total
    while True:
        adds = [_best_move(layer, r, layer.upper, +1, slack) for layer, r in zip(layers, ranks)]
        found = [i for i, move in enumerate(adds) if move is not None]
        if not found:
            return ranks
        li = max(found, key=lambda i: (adds[i][0], -i))
        _, ranks[li], spent = adds[li]
        slack -= spent


def budget_at_step(budget: int, ceiling: int, step: int, ramp_steps: int | None) -> int:
    """The budget in force at optimizer step `step`: `budget` itself without a ramp (or after it); during a ramp of
    `ramp_steps` steps, a cubic descent from `ceiling` (the adapter at `r_max` everywhere, so no constraint) to
    `budget`, AdaLoRA's schedule shape: `budget + (ceiling - budget) * (1 - step / ramp_steps)^3`."""
    if not ramp_steps or step >= ramp_steps or ceiling <= budget:
        return int(budget)
    return int(budget + math.floor((ceiling - budget) * (1.0 - step / ramp_steps) ** 3))
