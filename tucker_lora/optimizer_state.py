"""Makes a core's optimizer state follow the rank-adaptive cycle (METHOD section 4).

The core is stored at capacity (see `tucker_lora/rank_ops.py`), so its optimizer state keeps its shape too; only
the values are transformed:

* after augmentation the new (padded) entries start at zero: everything outside the old active block is zeroed;
* after truncation the first moment (Adam's `exp_avg`, SGD's `momentum_buffer`) is rotated with the same transforms
  as the core, `m <- m x_i P_i^T`;
* the second moment (`exp_avg_sq`, `max_exp_avg_sq`) is mapped with the elementwise squares of the rotations,
  `v <- v x_i (P_i * P_i)^T`. This is the exact transform of the per-entry variances of a gradient whose entries
  are independent, it keeps `v >= 0`, it is the identity when nothing is cut, and it keeps Adam's normalized step
  bounded: by Cauchy-Schwarz, `m'_k^2 <= v'_k * sum_j m_j^2 / v_j`. Rotating `sqrt(v)` and squaring can instead
  produce `v'_k = 0` next to `m'_k != 0`, i.e. a step of size `lr * m / eps`;
* everything beyond the new active block is zeroed, so stale state cannot leak back.

Supported: `torch.optim.Adam`, `torch.optim.AdamW` (with or without amsgrad) and `torch.optim.SGD` with momentum.
Any other optimizer gets its state for the core reset, with one warning per optimizer class. The step counters are
kept. Every function accepts a torch optimizer or a wrapper with `.optimizer` (accelerate's `AcceleratedOptimizer`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .rank_ops import _block, zero_outside
from .tucker_ops import mode_product

_FIRST_MOMENTS = {torch.optim.Adam: ("exp_avg",), torch.optim.SGD: ("momentum_buffer",)}
_SECOND_MOMENTS = {torch.optim.Adam: ("exp_avg_sq", "max_exp_avg_sq"), torch.optim.SGD: ()}
_WARNED_CLASSES: set[type] = set()


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Returns the torch optimizer inside `optimizer` (following `.optimizer` attributes of wrappers).

    Raises:
        `TypeError`: if no `torch.optim.Optimizer` is found.
    """
    inner = optimizer
    # wrappers such as accelerate's AcceleratedOptimizer subclass torch.optim.Optimizer themselves: unwrap first
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer) and inner.optimizer is not inner:
        inner = inner.optimizer
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    raise TypeError(
        f"expected a torch.optim.Optimizer or a wrapper with `.optimizer` (e.g. accelerate's AcceleratedOptimizer); "
        f"got {type(optimizer).__name__}"
    )


def rotate_first_moment(moment: torch.Tensor, widths: Sequence[int], rotations: Sequence[torch.Tensor]) -> None:
    """In place: `m[:r] <- m[:w] x_i P_i^T` for every adaptive mode i, zero outside the new block `[:r]`.

    Args:
        moment (`torch.Tensor`): core-shaped state tensor (at capacity).
        widths (`Sequence[int]`): active widths before truncation.
        rotations (`Sequence[torch.Tensor]`): `P_i[:, :r_i]`, `(width_i, r_i)`, as returned by `rank_ops.truncate`.
    """
    _transform(moment, widths, rotations, square=False)


def rotate_second_moment(moment: torch.Tensor, widths: Sequence[int], rotations: Sequence[torch.Tensor]) -> None:
    """In place: `v[:r] <- v[:w] x_i (P_i * P_i)^T` (elementwise squares), clamped at 0, zero outside `[:r]`.

    Args:
        moment (`torch.Tensor`): core-shaped second-moment tensor (at capacity).
        widths (`Sequence[int]`): active widths before truncation.
        rotations (`Sequence[torch.Tensor]`): `P_i[:, :r_i]`, `(width_i, r_i)`, as returned by `rank_ops.truncate`.
    """
    _transform(moment, widths, rotations, square=True)


@torch.no_grad()
def _transform(moment: torch.Tensor, widths: Sequence[int], rotations: Sequence[torch.Tensor], square: bool) -> None:
    if len(widths) != len(rotations):
        raise ValueError(f"need one rotation per width; got {len(rotations)} rotations for widths {list(widths)}")
    ranks = [int(p.shape[1]) for p in rotations]
    active = moment[_block(widths)].to(torch.float64)
    for i, rotation in enumerate(rotations):
        if rotation.shape[0] != active.shape[i]:
            raise ValueError(f"rotation {i} has {rotation.shape[0]} rows; the width of mode {i} is {active.shape[i]}")
        matrix = rotation.to(device=active.device, dtype=torch.float64).T
        active = mode_product(active, matrix * matrix if square else matrix, i)
    if square:
        active = active.clamp_min(0)
    moment.zero_()
    moment[_block(ranks)] = active.to(moment.dtype)


_Keys = tuple[tuple[str, ...], tuple[str, ...]]


def _state_keys(optimizer: torch.optim.Optimizer, core: torch.Tensor) -> _Keys | None:
    """(first-moment keys, second-moment keys) for a supported optimizer whose state holds nothing else core-shaped."""
    for cls in _FIRST_MOMENTS:
        if isinstance(optimizer, cls):
            first, second = _FIRST_MOMENTS[cls], _SECOND_MOMENTS[cls]
            state = optimizer.state.get(core, {})
            unknown = [
                key
                for key, value in state.items()
                if torch.is_tensor(value) and value.shape == core.shape and key not in first + second
            ]
            return None if unknown else (first, second)
    return None


def _reset(optimizer: torch.optim.Optimizer, core: torch.Tensor) -> None:
    if core in optimizer.state and optimizer.state[core]:
        cls = type(optimizer)
        if cls not in _WARNED_CLASSES:
            _WARNED_CLASSES.add(cls)
            warnings.warn(
                f"tucker_lora: the optimizer state of {cls.__name__} cannot follow rank changes (supported: Adam, "
                f"AdamW, SGD); the state of each Tucker core is reset after every rank update.",
                stacklevel=3,
            )
        del optimizer.state[core]


def _state_tensors(optimizer: torch.optim.Optimizer, core: torch.Tensor, keys: Sequence[str]) -> list[torch.Tensor]:
    state = optimizer.state.get(core, {})
    return [state[key] for key in keys if torch.is_tensor(state.get(key)) and state[key].shape == core.shape]


def _moments(optimizer: Any, param: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first- and second-moment state tensors of `param`; none (its state reset, with a warning) for an optimizer
    whose state cannot follow rank changes."""
    optimizer = unwrap_optimizer(optimizer)
    keys = _state_keys(optimizer, param)
    if keys is None:
        _reset(optimizer, param)
        return [], []
    return _state_tensors(optimizer, param, keys[0]), _state_tensors(optimizer, param, keys[1])


def state_after_augment(optimizer: Any, core: torch.Tensor, ranks: Sequence[int]) -> None:
    """Makes the state of `core` start the augmented entries at zero: zeros it outside the old active block.

    Args:
        optimizer (`torch.optim.Optimizer` or a wrapper with `.optimizer`): the optimizer that steps `core`.
        core (`torch.nn.Parameter`): the core at capacity (the key of its optimizer state).
        ranks (`Sequence[int]`): the active ranks before augmentation.
    """
    first, second = _moments(optimizer, core)
    for tensor in first + second:
        zero_outside(tensor, ranks)


def state_after_truncate(
    optimizer: Any, core: torch.Tensor, widths: Sequence[int], rotations: Sequence[torch.Tensor]
) -> None:
    """Makes the state of `core` follow a truncation: rotates the moments with the core's rotations.

    Args:
        optimizer (`torch.optim.Optimizer` or a wrapper with `.optimizer`): the optimizer that steps `core`.
        core (`torch.nn.Parameter`): the core at capacity (the key of its optimizer state).
        widths (`Sequence[int]`): the active widths before truncation.
        rotations (`Sequence[torch.Tensor]`): `P_i[:, :r_i]` per adaptive mode, as returned by `rank_ops.truncate`.

    Example:

    ```python
    ranks, rotations = truncate(core, bases, widths, tau=0.1, r_min=1, r_max=16)
    state_after_truncate(optimizer, core, widths, rotations)
    ```
    """
    first, second = _moments(optimizer, core)
    for tensor in first:
        rotate_first_moment(tensor, widths, rotations)
    for tensor in second:
        rotate_second_moment(tensor, widths, rotations)


def basis_state_after_augment(optimizer: Any, basis: torch.Tensor, rank: int) -> None:
    """With `train_bases`, makes the state of `basis` start its new columns at zero: zeros columns `[rank:]`.

    Args:
        optimizer (`torch.optim.Optimizer` or a wrapper with `.optimizer`): the optimizer that steps `basis`.
        basis (`torch.nn.Parameter`): one basis at capacity, `(n, cap)`.
        rank (`int`): the active rank before augmentation.
    """
    first, second = _moments(optimizer, basis)
    for tensor in first + second:
        zero_outside(tensor.T, [rank])


def basis_state_after_truncate(optimizer: Any, basis: torch.Tensor, width: int, rotation: torch.Tensor) -> None:
    """With `train_bases`, makes the state of `basis` follow `U <- U P`: `m <- m P`, `v <- v (P * P)`.

    Args:
        optimizer (`torch.optim.Optimizer` or a wrapper with `.optimizer`): the optimizer that steps `basis`.
        basis (`torch.nn.Parameter`): one basis at capacity, `(n, cap)`.
        width (`int`): the active width before truncation.
        rotation (`torch.Tensor`): `P[:, :r]`, `(width, r)`, as returned by `rank_ops.truncate` for this mode.
    """
    first, second = _moments(optimizer, basis)
    # the columns of a basis are its mode 1: transform the transposed view, whose mode 0 they are
    for tensor in first:
        rotate_first_moment(tensor.T, [width], [rotation])
    for tensor in second:
        rotate_second_moment(tensor.T, [width], [rotation])
