"""The rank cycle for all layers of one shape at once: retraction, augmentation and truncation on stacked tensors.

`rank_ops` holds the per-layer reference; this module computes the same maths for a batch of same-shape layers (same
core and basis shapes, dtypes and device), so that the number of operator calls and host-device transfers of a
cycle event does not grow with the number of layers. Layers of one batch may have different active ranks. Every
event works on the leading columns that some layer of the batch uses (per mode the largest active width, not the
capacity: the storage contract of `docs/design.md` keeps everything beyond a layer's own width at zero), so its cost
and its stacked copies follow the active ranks; the smaller widths of other layers are padded with exact zeros, and
per-layer ranks enter as masks:

* a Gram matrix of zero-padded columns is block diagonal, `[[A, 0], [0, 0]]`. Its padded diagonal is set to a value
  the decomposition keeps apart: `1` for Cholesky (so the padded factor is the identity and leaves the padded
  columns at zero), `-(1 + trace A)` for `eigh` (so the padded eigenvalues sort below every eigenvalue of `A` and
  their eigenvectors are the padded coordinates);
* per-layer counts (new directions, kept ranks) become column masks, and moving columns to other positions is a
  product with a 0/1 matrix (exact in floating point).

Writing back, every column (and core entry) past the leading block written is set to zero.

As in `rank_ops`, tall matrices (bases, gradients) stay on their device and every decomposition runs on the CPU in
float64, on the stacked small matrices: a few transfers per event and batch, whatever the number of layers. Where a
batched Cholesky factorization fails (a Gram matrix not numerically positive definite), the batch falls back to the
per-layer reference, which switches to a Householder QR. The ranks chosen equal the reference's; the factors agree
to rounding (eigenvector signs may differ for repeated singular values, `dW` does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .optimizer_state import _moments
from .rank_ops import Spectra, _compute_dtype, check_bounds

_CPU = torch.device("cpu")


def _leading(widths: Sequence[int]) -> tuple[slice, ...]:
    """The index of the leading block `[:w_0, :w_1, ...]` of stacked tensors (the layer axis whole)."""
    return (slice(None),) + tuple(slice(0, int(w)) for w in widths)


def _write(targets: list[torch.Tensor], values: torch.Tensor) -> None:
    """`targets[l] = values[l]`, `values` `(L, ...)` a leading block of the targets' shape, padded with zeros: one
    conversion, one pad and one multi-tensor copy for the whole batch."""
    values = values.to(device=targets[0].device, dtype=targets[0].dtype)
    spec = []
    for size, target in zip(reversed(values.shape[1:]), reversed(targets[0].shape)):
        spec += [0, target - size]
    torch._foreach_copy_(targets, list(torch.nn.functional.pad(values, spec).unbind(0)))


class LayerBatch:
    """Same-shape layers of one adapter: their cores, bases and active ranks."""

    def __init__(self, layers: list[Any], name: str) -> None:
        self.layers, self.name = layers, name
        self.cores = [layer.tucker_core[name] for layer in layers]
        self.bases = [list(layer.tucker_bases[name]) for layer in layers]  # [layer][mode]
        self.n_modes = len(self.bases[0])
        self.device = self.cores[0].device

    def __len__(self) -> int:
        return len(self.layers)

    def ranks(self) -> list[list[int]]:
        return [layer.active_ranks(self.name) for layer in self.layers]

    def stacked_core(self, widths: Sequence[int]) -> torch.Tensor:
        """The cores' leading blocks `[:widths[0], :widths[1], ...]` (trailing modes whole), `(L, w_0, w_1, ...)`,
        float64 on the CPU: one transfer."""
        return torch.stack([c.data for c in self.cores])[_leading(widths)].to(device=_CPU, dtype=torch.float64)

    def stacked_basis(self, mode: int, dtype: torch.dtype, width: int) -> torch.Tensor:
        """The leading `width` columns of the bases of `mode`, `(L, n, width)` in `dtype`."""
        return torch.stack([b[mode].data for b in self.bases])[..., :width].to(dtype)

    def basis_dtype(self, mode: int) -> torch.dtype:
        return _compute_dtype(self.bases[0][mode])

    def write_core(self, core: torch.Tensor) -> None:
        """Writes `core` `(L, w_0, w_1, ...)` into the leading blocks of the cores, zeros the rest."""
        _write([c.data for c in self.cores], core)

    def write_basis(self, mode: int, basis: torch.Tensor) -> None:
        """Writes `basis` `(L, n, w)` into the leading `w` columns of the bases of `mode`, zeros the others."""
        _write([b[mode].data for b in self.bases], basis)


def kept_gradients(batch: LayerBatch) -> list[list[torch.Tensor | None]]:
    """Copies of the basis gradients `[layer][mode]` in the leading columns an augmentation of `batch` reads (per mode
    the largest rank of the batch): per mode one stack, narrowed and copied, whatever the number of layers."""
    kept: list[list[torch.Tensor | None]] = [[] for _ in batch.layers]
    for mode, width in enumerate(_widest(batch.ranks())):
        grads = [b[mode].grad for b in batch.bases]
        if all(g is not None for g in grads):
            copies = torch.stack(grads)[..., :width].clone().unbind(0)
        else:  # some basis had no gradient: one copy per layer
            copies = [None if g is None else g[:, :width].clone() for g in grads]
        for layer, copy in zip(kept, copies):
            layer.append(copy)
    return kept


def shape_batches(layers: Sequence[tuple[str, Any]], name: str) -> list[LayerBatch]:
    """The `(module name, layer)` pairs of an adapter grouped by the shapes, dtypes and device of core and bases (a
    conv with its channel modes, and one with all four modes adaptive, land in different batches)."""
    groups: dict[tuple, list[Any]] = {}
    for _, layer in layers:
        core, bases = layer.tucker_core[name], list(layer.tucker_bases[name])
        key = (
            type(layer).__name__,
            tuple(core.shape),
            core.dtype,
            core.device,
            tuple((tuple(b.shape), b.dtype) for b in bases),
        )
        groups.setdefault(key, []).append(layer)
    return [LayerBatch(group, name) for group in groups.values()]


# ---- stacked tensor maths ---------------------------------------------------------------------------------------


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Batched mode unfolding of `(L, a_0, a_1, ...)`: `(L, a_mode, prod of the others)`."""
    return x.movedim(mode + 1, 1).reshape(x.shape[0], x.shape[mode + 1], -1)


def _mode_product(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """Batched `x x_mode matrix`, `matrix` `(L, m, a_mode)`."""
    moved = x.movedim(mode + 1, 1)
    shape = list(moved.shape)
    shape[1] = matrix.shape[1]
    return (matrix @ moved.reshape(x.shape[0], x.shape[mode + 1], -1)).reshape(shape).movedim(1, mode + 1)


def _widest(ranks: Sequence[Sequence[int]]) -> list[int]:
    """Per mode the largest of the layers' ranks: the leading columns an event has to touch."""
    return [max(column) for column in zip(*ranks)]


def _column_mask(counts: Sequence[int], size: int, device: torch.device = _CPU) -> torch.Tensor:
    """`(L, size)` bool, true in the first `counts[l]` columns."""
    return torch.arange(size, device=device) < torch.tensor(list(counts), device=device)[:, None]


def _block_mask(ranks: Sequence[Sequence[int]], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """`(L, *shape)` bool, true inside the leading block `[:r_0, :r_1, ...]` of every layer (trailing modes whole)."""
    mask = torch.ones(len(ranks), *shape, dtype=torch.bool, device=device)
    for mode in range(len(ranks[0])):
        cols = _column_mask([r[mode] for r in ranks], shape[mode], device)
        view = [len(ranks)] + [1] * len(shape)
        view[mode + 1] = shape[mode]
        mask &= cols.reshape(view)
    return mask


def _orthonormalize(u: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Batched Cholesky-QR of the active columns of `u` `(L, n, w)` (the others zero): `q` with orthonormal active
    columns and zero others, and `tri` `(L, w, w)` (CPU float64, the identity on the inactive diagonal) with
    `u = q @ tri`. None when a Gram matrix is not numerically positive definite."""
    gram = (u.mT @ u).to(device=_CPU, dtype=torch.float64)
    gram = gram + torch.diag_embed((~active).to(gram.dtype))
    tri, info = torch.linalg.cholesky_ex(gram, upper=True)
    if bool(info.any()) or not bool(torch.isfinite(tri).all()):
        return None
    q = torch.linalg.solve_triangular(tri.to(u), u, upper=True, left=False)
    return q, tri


def _eigh_descending(gram: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the active blocks of stacked Gram matrices (CPU float64), descending: singular values (padded
    with zeros) and eigenvectors (rows outside the active block zero)."""
    shift = 1.0 + torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    padded = gram - torch.diag_embed((~active).to(gram.dtype) * shift[:, None])
    values, vectors = torch.linalg.eigh(padded)
    sigma = values.flip(-1).clamp_min(0).sqrt() * active.to(values.dtype)  # padded values sort last after the flip
    vectors = vectors.flip(-1) * active[:, :, None].to(vectors.dtype)
    return sigma, vectors


# ---- retraction -------------------------------------------------------------------------------------------------


@torch.no_grad()
def retract(batch: LayerBatch) -> bool:
    """`rank_ops.retract` for every layer of `batch`; False (nothing written) when the reference must do it."""
    ranks = batch.ranks()
    widths = _widest(ranks)
    core = batch.stacked_core(widths)
    new_bases = []
    for mode, width in enumerate(widths):
        u = batch.stacked_basis(mode, batch.basis_dtype(mode), width)
        active = _column_mask([r[mode] for r in ranks], width)
        result = _orthonormalize(u, active.to(u.device))
        if result is None:
            return False
        q, tri = result
        core = _mode_product(core, tri, mode)
        new_bases.append(q)
    for mode, q in enumerate(new_bases):
        batch.write_basis(mode, q)
    batch.write_core(core)
    return True


# ---- augmentation -----------------------------------------------------------------------------------------------


def _stacked_grads(grads: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """The leading columns of the gradients (each `(n, >= their layer's rank)`, or None: zero), as `like` `(L, n, w)`
    in its dtype, zero-padded where a gradient is narrower."""
    width = like.shape[-1]
    if all(g is not None for g in grads) and len({g.shape for g in grads}) == 1 and grads[0].shape[1] >= width:
        return torch.stack(list(grads))[..., :width].to(like.dtype)
    out = torch.zeros_like(like)  # missing gradients or different widths (not from the updater): one copy per layer
    pairs = [(out[layer, :, : min(width, g.shape[1])], g[:, :width]) for layer, g in enumerate(grads) if g is not None]
    torch._foreach_copy_(*map(list, zip(*pairs)))
    return out


@torch.no_grad()
def augment(
    batch: LayerBatch,
    basis_grads: Sequence[Sequence[torch.Tensor | None]],
    *,
    rel_cut: float = 1e-3,
    zero_tol: float | None = None,
) -> list[list[int]] | None:
    """`rank_ops.augment` for every layer of `batch` (`basis_grads[l][mode]`: `dL/dU`, at capacity or only its
    leading columns, at least the layer's rank); returns the widths per layer, or None (nothing written) when the
    reference must do it."""
    ranks = batch.ranks()
    n_layers = len(batch)
    new_bases = []
    widths = [list(r) for r in ranks]
    for mode in range(batch.n_modes):
        n, cap = batch.bases[0][mode].shape
        rank = [r[mode] for r in ranks]
        width = max(rank)
        n_new = [min(r, cap - r, n - r) for r in rank]
        grads = [g[mode] for g in basis_grads]
        present = [g is not None for g in grads]
        if not any(present) or max(n_new) <= 0:
            new_bases.append(None)
            continue
        grad_dtype = next(g.dtype for g in grads if g is not None)
        u = batch.stacked_basis(mode, batch.basis_dtype(mode), width)
        active = _column_mask(rank, width, u.device)
        g = _stacked_grads(grads, u) * active[:, None, :]
        projected = g - u @ (u.mT @ g)
        projected = projected - u @ (u.mT @ projected)
        # one transfer: the Gram matrices of the projected gradients and the gradients' norms
        small = torch.cat(
            [(projected.mT @ projected).reshape(n_layers, -1), torch.linalg.vector_norm(g, dim=(1, 2))[:, None]], 1
        )
        del g
        small = small.to(device=_CPU, dtype=torch.float64)
        gram, g_norm = small[:, :-1].reshape(n_layers, width, width), small[:, -1]
        finite = torch.isfinite(small).all(-1)
        gram = torch.where(finite[:, None, None], gram, torch.zeros_like(gram))
        sigma, right = _eigh_descending(gram, _column_mask(rank, width))
        if zero_tol is None:
            eps = (
                max(torch.finfo(grad_dtype).eps, torch.finfo(torch.float32).eps)
                if grad_dtype.is_floating_point
                else 0.0
            )
            zero_tol = 100 * eps
        usable = finite & (g_norm != 0) & (sigma[:, 0] > zero_tol * g_norm) & torch.tensor(present)
        above = (sigma > rel_cut * sigma[:, :1]).sum(-1)
        k = torch.minimum(torch.tensor(n_new).clamp_min(0), above) * usable
        k_list = [int(x) for x in k.tolist()]
        if max(k_list) == 0:
            new_bases.append(None)
            continue
        keep = _column_mask(k_list, width)
        coef = right * torch.where(keep, 1.0 / torch.where(keep, sigma, 1.0), 0.0)[:, None, :]
        new = projected @ coef.to(projected)  # the leading left singular vectors, in columns [:k]
        del projected
        new = new - u @ (u.mT @ new)
        result = _orthonormalize(new, keep.to(new.device))
        if result is None:
            return None
        new, _ = result
        # columns [:k] move to [r : r + k]: a 0/1 matrix, exact
        grown = max(r + kk for r, kk in zip(rank, k_list))
        shift = torch.zeros(n_layers, width, grown, dtype=torch.float64)
        for layer, (r, kk) in enumerate(zip(rank, k_list)):
            if kk:
                shift[layer, torch.arange(kk), torch.arange(r, r + kk)] = 1.0
        new_bases.append(torch.nn.functional.pad(u, (0, grown - width)) + new @ shift.to(new))
        for layer, kk in enumerate(k_list):
            widths[layer][mode] = rank[layer] + kk
    for mode, basis in enumerate(new_bases):
        if basis is not None:
            batch.write_basis(mode, basis)
    return widths


def state_after_augment(optimizer: Any, batch: LayerBatch, ranks: list[list[int]], train_bases: bool) -> None:
    """`optimizer_state.state_after_augment` (and the bases' counterpart with `train_bases`) for the whole batch:
    the moments are zeroed outside the old active blocks, one masked product per moment."""
    params = [batch.cores] + ([[b[m] for b in batch.bases] for m in range(batch.n_modes)] if train_bases else [])
    for slot, tensors in enumerate(params):
        moments = [_moments(optimizer, p) for p in tensors]
        flat = [m[0] + m[1] for m in moments]
        if not flat[0] or any(len(f) != len(flat[0]) for f in flat):
            continue
        shape = tensors[0].shape
        if slot == 0:
            mask = _block_mask(ranks, shape, batch.device)
        else:
            mask = _column_mask([r[slot - 1] for r in ranks], shape[1], batch.device)[:, None, :].expand(-1, *shape)
        for index in range(len(flat[0])):
            targets = [f[index] for f in flat]
            torch._foreach_mul_(targets, list(mask.to(targets[0].dtype).unbind(0)))


# ---- truncation -------------------------------------------------------------------------------------------------


class BatchSpectra:
    """Phase 1 of a truncation for a batch: the stacked leading blocks of the cores `(L, w_0, w_1, ...)` (CPU
    float64, zero outside each layer's active block; `w_i` the largest width of mode i), per mode the singular values
    `(L, w_i)` (descending, zero-padded) and left singular vectors `(L, w_i, w_i)`, the cores' norms `(L,)` and the
    widths of every layer."""

    def __init__(self, core, sigmas, rotations, norms, widths) -> None:
        self.core, self.sigmas, self.rotations, self.norms, self.widths = core, sigmas, rotations, norms, widths

    def layer(self, index: int) -> Spectra:
        """The per-layer `rank_ops.Spectra` of layer `index` (for rank rules written against one layer)."""
        widths = self.widths[index]
        active = self.core[index][tuple(slice(0, w) for w in widths)]
        rotations = [p[index, :w, :w] for p, w in zip(self.rotations, widths)]
        sigmas = [s[index, :w] for s, w in zip(self.sigmas, widths)]
        return Spectra(active, rotations, sigmas)


@torch.no_grad()
def truncation_spectra(batch: LayerBatch) -> BatchSpectra:
    """Phase 1 (`rank_ops.truncation_spectra` for every layer of `batch`): one transfer of the stacked cores, one
    batched `eigh` per mode."""
    widths = batch.ranks()
    core = batch.stacked_core(_widest(widths))
    sigmas, rotations = [], []
    for mode in range(batch.n_modes):
        mat = _unfold(core, mode)
        sigma, vectors = _eigh_descending(mat @ mat.mT, _column_mask([w[mode] for w in widths], mat.shape[1]))
        sigmas.append(sigma)
        rotations.append(vectors)
    norms = torch.linalg.vector_norm(core.reshape(len(batch), -1), dim=1)
    return BatchSpectra(core, sigmas, rotations, norms, widths)


def ranks_for_tolerance(
    spectra: BatchSpectra, tau: float, r_min: int | Sequence[int], r_max: int | Sequence[int]
) -> list[list[int]]:
    """Phase 2, tolerance rule (`rank_ops.ranks_for_tolerance`) for every layer, on the host from the stacked singular
    values: per mode the smallest r with `||sigma[r:]||_2 <= tau * ||C||_F`, clamped to `[r_min, r_max]` and the
    width."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"`tau` must be in [0, 1); got {tau}")
    n_modes = len(spectra.sigmas)
    r_min, r_max = check_bounds(r_min, r_max, n_modes)
    threshold = (tau * spectra.norms)[:, None]
    ranks = []
    for mode, sigma in enumerate(spectra.sigmas):
        tails = torch.cumsum(sigma.flip(-1) ** 2, -1).flip(-1).sqrt()  # tails[:, r] = ||sigma[r:]||, zero past width
        counts = (tails > threshold).sum(-1).clamp(min=r_min[mode], max=r_max[mode])
        width = torch.tensor([w[mode] for w in spectra.widths])
        ranks.append(torch.minimum(counts, width))
    return torch.stack(ranks, 1).tolist()


@torch.no_grad()
def apply_truncation(batch: LayerBatch, spectra: BatchSpectra, ranks: list[list[int]]) -> list[torch.Tensor] | None:
    """Phase 3 (`rank_ops.apply_truncation` for every layer of `batch`): keeps the leading `ranks[l][i]` directions
    of every mode. Returns per mode the zero-padded rotations `(L, w_i, k_i)` (CPU float64; `P_i[:w, :r]` of each
    layer in its leading block; `w_i` the largest width, `k_i` the largest kept rank of mode i) that the optimizer
    state must follow, or None (nothing written) when the reference must do it."""
    for layer, (width, rank) in enumerate(zip(spectra.widths, ranks)):
        for mode, (w, r) in enumerate(zip(width, rank)):
            if not 0 <= r <= w:
                raise ValueError(f"`ranks[{layer}][{mode}]` must be in [0, {w}] (the width); got {r}")
    core = spectra.core
    new_bases, rotations = [], []
    for mode in range(batch.n_modes):
        width = spectra.rotations[mode].shape[-1]
        kept = [r[mode] for r in ranks]
        widest = max(kept)
        rotation = spectra.rotations[mode][:, :, :widest] * _column_mask(kept, widest)[:, None, :]
        u = batch.stacked_basis(mode, batch.basis_dtype(mode), width)
        result = _orthonormalize(u @ rotation.to(u), _column_mask(kept, widest, u.device))
        del u
        if result is None:
            return None
        q, tri = result
        core = _mode_product(core, tri @ rotation.mT, mode)
        new_bases.append(q)
        rotations.append(rotation)
    for mode, q in enumerate(new_bases):
        batch.write_basis(mode, q)
    batch.write_core(core)
    return rotations


def per_layer_rotations(rotations: list[torch.Tensor], widths: list[list[int]], ranks: list[list[int]]):
    """The reference's rotations `P_i[:w, :r]` of every layer from the padded ones."""
    return [
        [p[layer, :w, :r] for p, w, r in zip(rotations, widths[layer], ranks[layer])] for layer in range(len(widths))
    ]


@torch.no_grad()
def state_after_truncate(
    optimizer: Any,
    batch: LayerBatch,
    rotations: list[torch.Tensor],
    train_bases: bool,
    basis_modes: Sequence[int] | None = None,
) -> bool:
    """`optimizer_state.state_after_truncate` (and the bases' counterpart with `train_bases`) for the whole batch:
    first moments `m <- m x_i P_i^T`, second moments `v <- v x_i (P_i * P_i)^T` clamped at 0, with the padded
    rotations `(L, w_i, k_i)` of `apply_truncation`, on the leading blocks (everything outside the new blocks is
    zeroed). `basis_modes[i]`: the mode whose rotation the state of basis `i` follows (default its own; a folded
    output basis `K = U C` follows the in-mode's, `absorbed_core`). False when the moments of the layers differ in
    structure (the caller then uses the per-layer functions)."""
    device = batch.device
    padded = [p.to(device) for p in rotations]
    widths = [p.shape[1] for p in padded]
    params = [batch.cores] + ([[b[m] for b in batch.bases] for m in range(batch.n_modes)] if train_bases else [])
    plans = []
    for tensors in params:
        moments = [_moments(optimizer, p) for p in tensors]
        if any(len(m[0]) != len(moments[0][0]) or len(m[1]) != len(moments[0][1]) for m in moments):
            return False
        plans.append(moments)
    for slot, moments in enumerate(plans):
        for kind in (0, 1):
            for index in range(len(moments[0][kind])):
                targets = [m[kind][index] for m in moments]
                if slot == 0:
                    x = torch.stack(targets)[_leading(widths)].to(torch.float64)
                    for mode, p in enumerate(padded):
                        x = _mode_product(x, (p * p if kind else p).mT, mode)
                else:
                    p = padded[slot - 1 if basis_modes is None else basis_modes[slot - 1]]
                    x = torch.stack(targets)[..., : p.shape[1]].to(torch.float64)
                    x = x @ (p * p if kind else p)
                _write(targets, x.clamp_min(0) if kind else x)
                del x
    return True


def set_ranks(batch: LayerBatch, ranks: list[list[int]]) -> None:
    """Sets the active ranks of every layer: the rank buffers in one transfer and one copy, the caches on the host."""
    buffers = [layer.tucker_ranks[batch.name] for layer in batch.layers]
    values = torch.tensor(ranks, dtype=buffers[0].dtype).to(buffers[0].device)
    torch._foreach_copy_(buffers, list(values.unbind(0)))
    for layer, r in zip(batch.layers, ranks):
        layer._ranks_cache[batch.name] = [int(x) for x in r]
