"""Pure tensor maths of the rank-adaptive cycle: basis augmentation and HOSVD truncation.

Convention (the same as `docs/design.md` and `tucker_lora/tucker_ops.py`): a Tucker tensor is
`W = C x_1 U_1 ... x_d U_d`, `bases[i]: (n_i, r_i)` with orthonormal columns, core `(r_1, ..., r_d)`;
`unfold(X, i)` moves axis i to the front, then reshapes to `(size_i, -1)`.

Tensors here are stored at a fixed *capacity*: `bases[i]` is `(n_i, cap_i)`, the core is `(cap_0, cap_1, ...)` (a conv
core keeps its spatial modes, `(cap_out, cap_in, kh, kw)`), and only the active block `core[:r_0, :r_1, ...]`,
`bases[i][:, :r_i]` is in use. The adaptive modes are the leading `len(bases)` modes of the core. Everything outside
the active block is kept at zero. The functions below modify the tensors in place (under `torch.no_grad()`) and never
change a shape. Whatever the storage dtype, they compute in float64 (float32 for bases above `_FLOAT64_MAX_NUMEL`
elements): tall matrices (bases, gradients) only meet matrix products on their own device; every decomposition
(eigh, Cholesky) runs on small `width x width` matrices on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tucker_ops import mode_product, unfold

# Tensors up to this many elements are processed in float64 (the core and typical bases are far below it).
_FLOAT64_MAX_NUMEL = 1 << 22


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    numel = max(t.numel() for t in tensors)
    return torch.float64 if numel <= _FLOAT64_MAX_NUMEL else torch.float32


def _block(ranks: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, int(r)) for r in ranks)


def _per_mode(value: int | Sequence[int], n_modes: int, name: str) -> list[int]:
    values = [int(value)] * n_modes if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n_modes:
        raise ValueError(f"`{name}` must have one entry per adaptive mode ({n_modes}); got {list(values)}")
    if any(v < 0 for v in values):
        raise ValueError(f"`{name}` must be >= 0; got {values}")
    return values


def _check_layout(core: torch.Tensor, bases: Sequence[torch.Tensor], ranks: Sequence[int], name: str) -> None:
    if len(bases) > core.dim():
        raise ValueError(f"got {len(bases)} bases for a core with {core.dim()} modes; at most one basis per mode")
    if len(ranks) != len(bases):
        raise ValueError(f"`{name}` must have one entry per basis ({len(bases)}); got {list(ranks)}")
    for i, (basis, r) in enumerate(zip(bases, ranks)):
        if basis.dim() != 2 or basis.shape[1] != core.shape[i]:
            raise ValueError(
                f"basis {i} has shape {tuple(basis.shape)}, but the core's mode {i} has capacity {core.shape[i]}"
            )
        if not 0 <= int(r) <= basis.shape[1]:
            raise ValueError(f"`{name}[{i}]` must be in [0, {basis.shape[1]}] (the capacity); got {int(r)}")


def zero_outside(tensor: torch.Tensor, ranks: Sequence[int]) -> None:
    """Zeros, in place, every entry of `tensor` outside the leading block `tensor[:ranks[0], :ranks[1], ...]`.

    Args:
        tensor (`torch.Tensor`): a core-shaped tensor (the core itself or one of its optimizer moments).
        ranks (`Sequence[int]`): the block's size along the leading `len(ranks)` modes; later modes are kept whole.
    """
    with torch.no_grad():
        kept = tensor[_block(ranks)].clone()
        tensor.zero_()
        tensor[_block(ranks)] = kept


def _small(x: torch.Tensor) -> torch.Tensor:
    """A small matrix for a decomposition: float64 on the CPU (on an accelerator, tiny eigh/QR/SVD calls cost far
    more in launches and syncs than the copy)."""
    return x.detach().to(device="cpu", dtype=torch.float64)


def _orthonormalize(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`u = q @ tri` with orthonormal `q` and upper-triangular `tri` with a positive diagonal (CPU, float64).

    Cholesky-QR: the `k x k` Gram matrix is factored on the CPU; the tall `u` only meets matrix products and a
    triangular solve on its own device. Accurate for the well-conditioned `u` met here (nearly orthonormal columns);
    a Householder QR takes over if the Gram matrix is not numerically positive definite.
    """
    if u.shape[1] == 0:
        return u, torch.zeros(0, 0, dtype=torch.float64)
    tri, info = torch.linalg.cholesky_ex(_small(u.T @ u), upper=True)
    if info != 0 or not torch.isfinite(tri).all():
        q, tri = torch.linalg.qr(u)
        signs = torch.where(torch.diagonal(tri) < 0, -1.0, 1.0).to(u.dtype)
        return q * signs, _small(tri * signs[:, None])
    q = torch.linalg.solve_triangular(tri.to(u), u, upper=True, left=False)
    return q, tri


@torch.no_grad()
def retract(core: torch.Tensor, bases: Sequence[torch.Tensor], widths: Sequence[int]) -> None:
    """Makes every active basis orthonormal again without changing `dW` (in place).

    When the optimizer steps the bases (`train_bases=True`), they drift from orthonormality between cycle events. For
    each adaptive mode, `U_i = Q_i R_i` (QR of the active columns, positive diagonal) gives `U_i <- Q_i` and
    `C <- C x_i R_i`, so `C x_1 U_1 ... x_d U_d` is unchanged up to rounding. Inactive columns stay zero.

    Args:
        core (`torch.Tensor`): the core at capacity, modified in place.
        bases (`Sequence[torch.Tensor]`): one basis per adaptive mode, `(n_i, cap_i)`, modified in place.
        widths (`Sequence[int]`): the active widths.

    Example:

    ```python
    retract(core, bases, widths=[4, 4])
    ```
    """
    widths = [int(w) for w in widths]
    _check_layout(core, bases, widths, "widths")
    active = _small(core[_block(widths)])
    for i, (basis, width) in enumerate(zip(bases, widths)):
        if width == 0:
            continue
        dtype = _compute_dtype(basis)
        q, tri = _orthonormalize(basis[:, :width].to(dtype))
        active = mode_product(active, tri, i)
        basis[:, :width] = q.to(basis.dtype)
        basis[:, width:] = 0
    core.zero_()
    core[_block(widths)] = active.to(core.device, core.dtype)


@torch.no_grad()
def augment(
    core: torch.Tensor,
    bases: Sequence[torch.Tensor],
    ranks: Sequence[int],
    basis_grads: Sequence[torch.Tensor | None],
    *,
    rel_cut: float = 1e-3,
    zero_tol: float | None = None,
) -> list[int]:
    """Augments every adaptive basis with new directions from its gradient (METHOD section 3, step 1).

    For mode i with active rank `r_i`, the new directions are `orth((I - U U^T) dL/dU)` from the active columns of the
    gradient (`basis_grads[i][:, :r_i]`), projected against `U = bases[i][:, :r_i]` twice and kept only where their
    singular value exceeds `rel_cut` times the largest one; at most `r_i` of them, capped by the capacity and by
    `n_i - r_i`. They are written into columns `[r_i : r_i + k_i]` of the basis, in place. A mode is skipped (k_i = 0)
    when its gradient is missing or not finite, or its projected gradient is numerically zero (e.g. at a zero-core
    start, where every basis gradient vanishes). The core's new entries stay zero, so `dW` is unchanged.

    Args:
        core (`torch.Tensor`): the core at capacity, `(cap_0, ..., cap_{d-1}, ...)`; only zeroed outside the active
            block.
        bases (`Sequence[torch.Tensor]`): one basis per adaptive mode, `(n_i, cap_i)`, modified in place.
        ranks (`Sequence[int]`): the active ranks `r_i`.
        basis_grads (`Sequence[torch.Tensor | None]`): `dL/dU_i` at capacity `(n_i, cap_i)`, or its leading `r_i`
            columns or more (or `None`), accumulated over one optimizer step.
        rel_cut (`float`): relative singular-value cut for the new directions.
        zero_tol (`float`, *optional*): the projected gradient counts as zero when its largest singular value is at
            most `zero_tol * ||dL/dU_i||_F`. Defaults to `100 * eps` of the gradient's dtype (at least float32's).

    Returns:
        `list[int]`: the augmented widths `r_i + k_i`.

    Example:

    ```python
    widths = augment(core, bases, ranks=[4, 4], basis_grads=[u.grad for u in bases])
    ```
    """
    ranks = [int(r) for r in ranks]
    _check_layout(core, bases, ranks, "ranks")
    if len(basis_grads) != len(bases):
        raise ValueError(f"`basis_grads` must have one entry per basis ({len(bases)}); got {len(basis_grads)}")
    if not 0.0 < rel_cut < 1.0:
        raise ValueError(f"`rel_cut` must be in (0, 1); got {rel_cut}")
    zero_outside(core, ranks)
    widths = []
    for basis, rank, grad in zip(bases, ranks, basis_grads):
        n, cap = basis.shape
        width = rank
        n_new = min(rank, cap - rank, n - rank)
        if grad is not None and n_new > 0:
            new = _new_directions(basis[:, :rank], grad[:, :rank], n_new, rel_cut, zero_tol)
            width = rank + new.shape[1]
            basis[:, rank:width] = new.to(basis.dtype)
        basis[:, width:] = 0
        widths.append(width)
    return widths


def _new_directions(
    u: torch.Tensor, grad: torch.Tensor, n_new: int, rel_cut: float, zero_tol: float | None
) -> torch.Tensor:
    dtype = _compute_dtype(u)
    if zero_tol is None:
        eps = max(torch.finfo(grad.dtype).eps, torch.finfo(torch.float32).eps) if grad.is_floating_point() else 0.0
        zero_tol = 100 * eps
    u64, g = u.to(dtype), grad.to(dtype)
    empty = u64.new_zeros(u.shape[0], 0)
    projected = g - u64 @ (u64.T @ g)
    projected = projected - u64 @ (u64.T @ projected)
    # one transfer: the r x r Gram matrix of the projected gradient and the gradient's norm
    small = _small(torch.cat([(projected.T @ projected).reshape(-1), torch.linalg.vector_norm(g).reshape(1)]))
    gram, g_norm = small[:-1].reshape(projected.shape[1], -1), small[-1]
    if not torch.isfinite(small).all() or g_norm == 0:
        return empty
    eigvals, eigvecs = torch.linalg.eigh(gram)
    sigma, right = eigvals.flip(0).clamp_min(0).sqrt(), eigvecs.flip(1)
    if sigma[0] <= zero_tol * g_norm:
        return empty
    # sigma above the relative cut (>= 1e-3 of the largest) is accurate from the Gram matrix in float64
    k = min(n_new, int((sigma > rel_cut * sigma[0]).sum()))
    new = projected @ (right[:, :k] / sigma[:k]).to(projected)  # the leading left singular vectors
    new = new - u64 @ (u64.T @ new)
    new, _ = _orthonormalize(new)
    return new


@torch.no_grad()
def truncate(
    core: torch.Tensor,
    bases: Sequence[torch.Tensor],
    widths: Sequence[int],
    tau: float,
    r_min: int | Sequence[int],
    r_max: int | Sequence[int],
) -> tuple[list[int], list[torch.Tensor]]:
    """Truncates an augmented Tucker adapter by HOSVD of its active core block (METHOD section 3, step 3).

    For every adaptive mode i, the SVD of `Mat_i(C)` (via the eigendecomposition of the Gram matrix
    `Mat_i(C) Mat_i(C)^T`, `width_i x width_i`) gives P_i and sigma; the new rank is the smallest r with
    `||sigma[r:]||_2 <= tau * ||C||_F`, clamped to `[r_min, r_max]` and to the width. Then `U_i <- U_i P_i[:, :r]`
    (re-orthonormalized, the small triangular factor absorbed into the core, so `dW` does not move) and
    `C <- C x_i P_i[:, :r]^T`. Everything outside the new active block is zeroed. If nothing is cut, `dW` is unchanged;
    otherwise the error is at most `sqrt(len(bases)) * tau * ||C||_F` (when `r_max` does not bind). A zero core gives
    ranks `r_min` and no NaN.

    Args:
        core (`torch.Tensor`): the core at capacity, modified in place.
        bases (`Sequence[torch.Tensor]`): one basis per adaptive mode, `(n_i, cap_i)`, modified in place.
        widths (`Sequence[int]`): the current (augmented) active widths.
        tau (`float`): relative truncation tolerance, in [0, 1).
        r_min (`int` or `Sequence[int]`): lower rank bound (per mode if a sequence).
        r_max (`int` or `Sequence[int]`): upper rank bound (per mode if a sequence).

    Returns:
        `tuple[list[int], list[torch.Tensor]]`: the new ranks, and per mode the rotation `P_i[:, :r_i]`
        (`width_i x r_i`, float64 on the CPU) that the optimizer state must follow.

    Example:

    ```python
    ranks, rotations = truncate(core, bases, widths, tau=0.1, r_min=1, r_max=16)
    ```
    """
    widths = [int(w) for w in widths]
    _check_layout(core, bases, widths, "widths")
    spectra = truncation_spectra(core, widths)
    ranks = ranks_for_tolerance(spectra, widths, tau, r_min, r_max)
    return ranks, apply_truncation(core, bases, widths, spectra, ranks)


class Spectra:
    """The HOSVD of one active core block: per adaptive mode the left singular vectors `rotations[i]`
    (`width_i x width_i`, float64 CPU) and singular values `sigmas[i]` (descending), and `||C||_F`."""

    def __init__(self, active: torch.Tensor, rotations: list[torch.Tensor], sigmas: list[torch.Tensor]) -> None:
        self.active, self.rotations, self.sigmas = active, rotations, sigmas
        self.norm = torch.linalg.vector_norm(active)

    def tails(self, mode: int) -> torch.Tensor:
        """`tails[r] = ||sigma[r:]||_2` for r = 0..width, summed from the smallest value up for accuracy."""
        sigma = self.sigmas[mode]
        return torch.cat([torch.cumsum(sigma.flip(0) ** 2, 0).flip(0).sqrt(), sigma.new_zeros(1)])


@torch.no_grad()
def truncation_spectra(core: torch.Tensor, widths: Sequence[int]) -> Spectra:
    """Phase 1 of a truncation: the mode singular values and vectors of the active block `core[:w_0, :w_1, ...]`."""
    widths = [int(w) for w in widths]
    active = _small(core[_block(widths)])
    rotations, sigmas = zip(*(_mode_svd(active, i) for i in range(len(widths)))) if widths else ((), ())
    return Spectra(active, list(rotations), list(sigmas))


def ranks_for_tolerance(
    spectra: Spectra,
    widths: Sequence[int],
    tau: float,
    r_min: int | Sequence[int],
    r_max: int | Sequence[int],
) -> list[int]:
    """Phase 2 (tolerance rule): per mode the smallest r with `||sigma[r:]||_2 <= tau * ||C||_F`, clamped to
    `[r_min, r_max]` and to the width."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"`tau` must be in [0, 1); got {tau}")
    r_min, r_max = check_bounds(r_min, r_max, len(widths))
    threshold = tau * spectra.norm
    return [
        min(max(int((spectra.tails(i) > threshold).sum()), r_min[i]), r_max[i], int(width))
        for i, width in enumerate(widths)
    ]


def check_bounds(r_min: int | Sequence[int], r_max: int | Sequence[int], n_modes: int) -> tuple[list[int], list[int]]:
    """Per-mode `r_min`, `r_max`, checked (`r_min <= r_max`, both >= 0)."""
    r_min = _per_mode(r_min, n_modes, "r_min")
    r_max = _per_mode(r_max, n_modes, "r_max")
    for lo, hi in zip(r_min, r_max):
        if lo > hi:
            raise ValueError(f"`r_min` must be <= `r_max`; got r_min={r_min}, r_max={r_max}")
    return r_min, r_max


@torch.no_grad()
def apply_truncation(
    core: torch.Tensor,
    bases: Sequence[torch.Tensor],
    widths: Sequence[int],
    spectra: Spectra,
    ranks: Sequence[int],
) -> list[torch.Tensor]:
    """Phase 3 of a truncation: keeps the leading `ranks[i]` singular directions of every mode (in place).

    `U_i <- U_i P_i[:, :r]` (re-orthonormalized, the small triangular factor absorbed into the core) and
    `C <- C x_i P_i[:, :r]^T`; everything outside the new block is zeroed. Returns the rotations `P_i[:, :r_i]`
    that the optimizer state must follow.
    """
    widths, ranks = [int(w) for w in widths], [int(r) for r in ranks]
    for i, (width, rank) in enumerate(zip(widths, ranks)):
        if not 0 <= rank <= width:
            raise ValueError(f"`ranks[{i}]` must be in [0, {width}] (the width); got {rank}")
    rotations = [rotation[:, :rank] for rotation, rank in zip(spectra.rotations, ranks)]
    new_core = spectra.active
    for i, (basis, width, rank) in enumerate(zip(bases, widths, ranks)):
        dtype = _compute_dtype(basis)
        u, tri = _orthonormalize(basis[:, :width].to(dtype) @ rotations[i].to(basis.device, dtype))
        new_core = mode_product(new_core, tri @ rotations[i].T, i)
        basis.zero_()
        basis[:, :rank] = u.to(basis.dtype)
    core.zero_()
    core[_block(ranks)] = new_core.to(core.device, core.dtype)
    return rotations


def _mode_svd(core: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values (descending) of `Mat_mode(core)`, from its Gram matrix."""
    mat = unfold(core, mode)
    if mat.shape[0] == 0:
        return mat.new_zeros(0, 0), mat.new_zeros(0)
    eigvals, eigvecs = torch.linalg.eigh(mat @ mat.T)
    return eigvecs.flip(1), eigvals.flip(0).clamp_min(0).sqrt()
