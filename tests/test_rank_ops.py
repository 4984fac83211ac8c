"""Invariants of the rank-adaptive cycle's maths (METHOD section 9, items 1-5)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tolerances import ORTHONORMALITY_TOL, tol
from tucker_lora.rank_ops import augment, retract, truncate

# (mode sizes, capacities, ranks, unfactored trailing modes): a Linear, a channel-Tucker conv, a full-Tucker conv
LAYOUTS = {
    "linear": ([12, 10], [8, 8], [3, 4], []),
    "conv_channels": ([9, 7], [6, 6], [2, 3], [3, 3]),
    "conv_all": ([8, 6, 3, 3], [6, 6, 3, 3], [3, 2, 2, 3], []),
    # capacity equal to the mode size (mode 0): where non-rank-revealing augmentation broke orthonormality
    "linear_full": ([8, 10], [8, 8], [3, 4], []),
    "conv_small": ([6, 7], [6, 6], [2, 3], [3, 3]),
}


def dense(core: torch.Tensor, bases: list[torch.Tensor]) -> torch.Tensor:
    """`core x_1 bases[0] x_2 bases[1] ...`, written independently of the package (tensordot, then move the axis)."""
    for mode, basis in enumerate(bases):
        core = torch.tensordot(basis, core.movedim(mode, 0), dims=([1], [0])).movedim(0, mode)
    return core


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def orthonormal(n: int, r: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return q.to(dtype)


def make_adapter(layout: str, dtype: torch.dtype = torch.float32, seed: int = 0, zero_core: bool = False):
    """Capacity-sized core and bases with a random active block, zero outside it."""
    sizes, caps, ranks, rest = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    bases = []
    for n, cap, r in zip(sizes, caps, ranks):
        basis = torch.zeros(n, cap, dtype=dtype)
        basis[:, :r] = orthonormal(n, r, gen, dtype)
        bases.append(basis)
    core = torch.zeros(*caps, *rest, dtype=dtype)
    if not zero_core:
        block = tuple(slice(0, r) for r in ranks)
        core[block] = torch.randn(core[block].shape, generator=gen, dtype=torch.float64).to(dtype)
    return core, bases, list(ranks)


def active_dense(core, bases, ranks):
    block = tuple(slice(0, r) for r in ranks)
    return dense(core[block].double(), [b[:, :r].double() for b, r in zip(bases, ranks)])


def ortho_error(basis: torch.Tensor, r: int) -> float:
    u = basis[:, :r].double()
    return float((u.T @ u - torch.eye(r, dtype=torch.float64)).abs().max()) if r else 0.0


def outside_is_zero(core, bases, ranks) -> bool:
    block = tuple(slice(0, r) for r in ranks)
    masked = core.clone()
    masked[block] = 0
    return bool((masked == 0).all()) and all(bool((b[:, r:] == 0).all()) for b, r in zip(bases, ranks))


def core_outside_is_zero(core, ranks) -> bool:
    masked = core.clone()
    masked[tuple(slice(0, r) for r in ranks)] = 0
    return bool((masked == 0).all())


# ---- item 1: gradient identity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,ranks", [([7, 6], [4, 4]), ([6, 5, 7], [2, 3, 4])])
def test_gradient_identity_dK_equals_dU_times_S_inverse_transpose(sizes, ranks):
    """dL/dK_i = dL/dU_i S_i^{-T}, with Mat_i(C)^T = Q_i R_i, S_i = R_i^T, K_i = U_i S_i (float64, quadratic loss)."""
    gen = torch.Generator().manual_seed(1)
    core = torch.randn(*ranks, generator=gen, dtype=torch.float64)
    bases = [orthonormal(n, r, gen) for n, r in zip(sizes, ranks)]
    target = torch.randn(*sizes, generator=gen, dtype=torch.float64)

    def loss(c, bs):
        return 0.5 * (dense(c, bs) - target).pow(2).sum()

    leaves = [b.clone().requires_grad_(True) for b in bases]
    loss(core, leaves).backward()
    for i in range(len(sizes)):
        q, r = torch.linalg.qr(unfold(core, i).T)
        s = r.T
        moved = [ranks[i]] + [n for j, n in enumerate(ranks) if j != i]
        core_q = q.T.reshape(moved).movedim(0, i)  # Mat_i(core_q) = Q_i^T, so core = core_q x_i S_i
        k = (bases[i] @ s).requires_grad_(True)
        loss(core_q, [k if j == i else b for j, b in enumerate(bases)]).backward()
        expected = torch.linalg.solve(s, leaves[i].grad.T).T  # dL/dU_i S_i^{-T}
        torch.testing.assert_close(k.grad, expected, **tol(torch.float64))
        assert k.grad.abs().max() > 1e-3  # the identity is not checked on a vanishing gradient


# ---- item 2: augmentation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_keeps_dw_starts_with_u_and_is_orthonormal(layout, dtype):
    core, bases, ranks = make_adapter(layout, dtype)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(b.shape, generator=gen, dtype=dtype) for b in bases]
    before_dw = active_dense(core, bases, ranks)
    before_bases = [b.clone() for b in bases]
    widths = augment(core, bases, ranks, grads)
    caps = [b.shape[1] for b in bases]
    sizes = [b.shape[0] for b in bases]
    assert widths == [min(2 * r, c, n) for r, c, n in zip(ranks, caps, sizes)]
    assert any(w > r for w, r in zip(widths, ranks))
    torch.testing.assert_close(active_dense(core, bases, widths), before_dw, **tol(dtype))
    for basis, old, r, w in zip(bases, before_bases, ranks, widths):
        assert torch.equal(basis[:, :r], old[:, :r])
        assert ortho_error(basis, w) < ORTHONORMALITY_TOL
    assert outside_is_zero(core, bases, widths)
    assert core_outside_is_zero(core, ranks)  # the new core entries are zero


def test_augment_uses_the_projected_active_gradient():
    core, bases, ranks = make_adapter("linear", torch.float64)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in bases]
    noisy = [g.clone() for g in grads]
    for g, r in zip(noisy, ranks):
        g[:, r:] = 1e6  # inactive columns of the gradient must be ignored
    other = [b.clone() for b in bases]
    widths = augment(core.clone(), bases, ranks, grads)
    assert augment(core.clone(), other, ranks, noisy) == widths
    for basis, same, g, r, w in zip(bases, other, grads, ranks, widths):
        torch.testing.assert_close(basis, same, **tol(torch.float64))
        u = basis[:, :r]
        projected = g[:, :r] - u @ (u.T @ g[:, :r])
        new = basis[:, r:w]
        # the new columns span the projected gradient (full column rank here: w - r == r)
        assert w - r == r
        torch.testing.assert_close(new @ (new.T @ projected), projected, **tol(torch.float64))


def test_augment_keeps_only_directions_above_the_relative_cut():
    core, bases, ranks = make_adapter("linear", torch.float64)
    gen = torch.Generator().manual_seed(4)
    u = bases[0][:, : ranks[0]]
    direction = torch.randn(bases[0].shape[0], 1, generator=gen, dtype=torch.float64)
    grad = torch.zeros_like(bases[0])
    # in span(U) + one strong new direction + one below the 1e-3 cut
    weak = torch.randn(bases[0].shape[0], 1, generator=gen, dtype=torch.float64)
    grad[:, : ranks[0]] = (
        u @ torch.randn(ranks[0], ranks[0], generator=gen, dtype=torch.float64)
        + direction @ torch.ones(1, ranks[0], dtype=torch.float64)
        + 1e-5 * weak @ torch.randn(1, ranks[0], generator=gen, dtype=torch.float64)
    )
    widths = augment(core, bases, ranks, [grad, None])
    assert widths == [ranks[0] + 1, ranks[1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_skips_numerically_zero_projected_gradients(dtype):
    core, bases, ranks = make_adapter("linear", dtype)
    gen = torch.Generator().manual_seed(5)
    u = bases[0][:, : ranks[0]]
    in_span = torch.zeros_like(bases[0])
    in_span[:, : ranks[0]] = u @ torch.randn(ranks[0], ranks[0], generator=gen, dtype=torch.float64).to(dtype)
    nan_grad = torch.full_like(bases[1], float("nan"))
    widths = augment(core, bases, ranks, [in_span, nan_grad])
    assert widths == ranks
    assert all(torch.isfinite(b).all() for b in bases)
    assert outside_is_zero(core, bases, ranks)


# ---- item 3: truncation -------------------------------------------------------------------------------------------


def expected_ranks(active: torch.Tensor, n_modes: int, tau: float) -> list[int]:
    """Smallest r with ||sigma[r:]||_2 <= tau ||C||_F, from an SVD (independent of the package's Gram route)."""
    norm = float(torch.linalg.vector_norm(active))
    ranks = []
    for i in range(n_modes):
        sigma = torch.linalg.svdvals(unfold(active, i)).tolist()
        ranks.append(next(r for r in range(len(sigma) + 1) if math.sqrt(sum(s * s for s in sigma[r:])) <= tau * norm))
    return ranks


def graded_adapter(layout: str, dtype: torch.dtype, seed: int = 0):
    """An adapter augmented to full capacity with a core whose mode-i singular values decay geometrically."""
    core, bases, ranks = make_adapter(layout, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    widths = augment(core, bases, ranks, [torch.randn(b.shape, generator=gen, dtype=dtype) for b in bases])
    block = tuple(slice(0, w) for w in widths)
    graded = torch.randn(core[block].shape, generator=gen, dtype=torch.float64)
    for i, w in enumerate(widths):
        scales = 0.3 ** torch.arange(w, dtype=torch.float64)
        graded = graded * scales.reshape([-1 if j == i else 1 for j in range(graded.dim())])
    core[block] = graded.to(dtype)
    return core, bases, widths


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("tau", [0.02, 0.1, 0.3])
def test_truncate_picks_smallest_rank_and_respects_the_hosvd_bound(layout, tau):
    core, bases, widths = graded_adapter(layout, torch.float64)
    block = tuple(slice(0, w) for w in widths)
    active = core[block].clone()
    before = active_dense(core, bases, widths)
    ranks, rotations = truncate(core, bases, widths, tau=tau, r_min=0, r_max=100)
    assert ranks == expected_ranks(active, len(bases), tau)
    assert any(r < w for r, w in zip(ranks, widths))
    error = float(torch.linalg.vector_norm(active_dense(core, bases, ranks) - before))
    bound = math.sqrt(len(bases)) * tau * float(torch.linalg.vector_norm(active))
    assert 0 < error <= bound
    for basis, rotation, r, w in zip(bases, rotations, ranks, widths):
        assert rotation.shape == (w, r)
        assert ortho_error(basis, r) < tol(torch.float64)["atol"]
        assert ortho_error(rotation, r) < tol(torch.float64)["atol"]
    expected_core = active
    for i, rotation in enumerate(rotations):
        expected_core = torch.tensordot(rotation.T, expected_core.movedim(i, 0), dims=([1], [0])).movedim(0, i)
    torch.testing.assert_close(core[tuple(slice(0, r) for r in ranks)], expected_core, **tol(torch.float64))
    assert outside_is_zero(core, bases, ranks)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_truncate_without_cut_leaves_dw_unchanged(layout, dtype):
    core, bases, widths = make_adapter(layout, dtype, seed=7)
    before = active_dense(core, bases, widths)
    # r_min = widths: nothing may be cut, even directions with zero singular value (a 3 x 4 core has one)
    ranks, _ = truncate(core, bases, widths, tau=0.0, r_min=widths, r_max=100)
    assert ranks == widths
    torch.testing.assert_close(active_dense(core, bases, ranks), before, **tol(dtype))
    assert all(ortho_error(b, r) < ORTHONORMALITY_TOL for b, r in zip(bases, ranks))


def test_truncate_clamps_to_r_min_and_r_max():
    core, bases, widths = graded_adapter("linear", torch.float64)
    free, _ = truncate(core.clone(), [b.clone() for b in bases], widths, tau=0.3, r_min=0, r_max=100)
    assert max(free) <= 3
    low, _ = truncate(core.clone(), [b.clone() for b in bases], widths, tau=0.3, r_min=5, r_max=100)
    assert low == [5, 5]
    high, _ = truncate(core.clone(), [b.clone() for b in bases], widths, tau=0.0, r_min=1, r_max=2)
    assert high == [2, 2]
    per_mode, _ = truncate(core.clone(), [b.clone() for b in bases], widths, tau=0.0, r_min=1, r_max=[5, 3])
    assert per_mode == [5, 3]
    clipped, _ = truncate(core.clone(), [b.clone() for b in bases], widths, tau=0.3, r_min=50, r_max=100)
    assert clipped == widths


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"tau": 1.5, "r_min": 1, "r_max": 4}, "`tau` must be in"),
        ({"tau": 0.1, "r_min": 5, "r_max": 4}, "`r_min` must be <= `r_max`"),
        ({"tau": 0.1, "r_min": [1], "r_max": 4}, "`r_min` must have one entry per adaptive mode"),
    ],
)
def test_truncate_rejects_bad_settings(kwargs, message):
    core, bases, ranks = make_adapter("linear")
    with pytest.raises(ValueError, match=message):
        truncate(core, bases, ranks, **kwargs)


# ---- item 4: zero core and zero singular values -------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero_core_cycle_is_nan_free(layout):
    core, bases, ranks = make_adapter(layout, zero_core=True)
    # a zero core makes every basis gradient zero
    widths = augment(core, bases, ranks, [torch.zeros_like(b) for b in bases])
    assert widths == ranks
    new_ranks, rotations = truncate(core, bases, widths, tau=0.1, r_min=1, r_max=100)
    assert new_ranks == [1] * len(bases)
    assert all(torch.isfinite(t).all() for t in [core, *bases, *rotations])
    assert core.abs().sum() == 0
    assert all(ortho_error(b, r) < ORTHONORMALITY_TOL for b, r in zip(bases, new_ranks))


def test_kept_zero_singular_values_are_nan_free():
    core, bases, ranks = make_adapter("linear", torch.float32)
    core.zero_()
    core[0, 0] = 2.0  # rank 1 in a 3 x 4 block: the other singular values are exactly zero
    before = active_dense(core, bases, ranks)
    new_ranks, rotations = truncate(core, bases, ranks, tau=0.1, r_min=3, r_max=8)
    assert new_ranks == [3, 3]
    assert all(torch.isfinite(t).all() for t in [core, *bases, *rotations])
    torch.testing.assert_close(active_dense(core, bases, new_ranks), before, **tol(torch.float32))
    assert all(ortho_error(b, r) < ORTHONORMALITY_TOL for b, r in zip(bases, new_ranks))


# ---- item 5: orthonormality over thousands of cycles --------------------------------------------------------------


@pytest.mark.parametrize("layout,cycles", [("linear_full", 2000), ("conv_small", 500)])
def test_orthonormality_over_many_cycles(layout, cycles):
    """float32 storage, capacity equal to the mode size (the regime where augmentation that is not rank-revealing
    broke orthonormality within 20 cycles in the prototype, METHOD section 3), random gradients of three kinds."""
    torch.manual_seed(0)
    r_max = LAYOUTS[layout][1][0] - 1
    core, bases, ranks = make_adapter(layout, torch.float32)
    worst, seen = 0.0, set()
    for cycle in range(cycles):
        kind = cycle % 4
        grads = []
        for basis, r in zip(bases, ranks):
            g = torch.randn(basis.shape)
            if kind == 1:  # nearly inside span(U): the projected gradient is tiny
                g = basis[:, :r] @ torch.randn(r, basis.shape[1]) + 1e-7 * g
            elif kind == 2:  # low rank
                g = torch.randn(basis.shape[0], 1) @ torch.randn(1, basis.shape[1])
            grads.append(g)
        widths = augment(core, bases, ranks, grads)
        worst = max(worst, *(ortho_error(b, w) for b, w in zip(bases, widths)))
        block = tuple(slice(0, w) for w in widths)
        active = core[block] / torch.linalg.vector_norm(core[block]).clamp_min(1e-12)
        core[block] = active + torch.randn(active.shape) * (0.02, 0.3, 1.0)[cycle % 3]
        ranks, _ = truncate(core, bases, widths, tau=0.15, r_min=1, r_max=r_max)
        seen.add(tuple(ranks))
        worst = max(worst, *(ortho_error(b, r) for b, r in zip(bases, ranks)))
        assert outside_is_zero(core, bases, ranks)
    assert worst < ORTHONORMALITY_TOL
    assert len(seen) >= 3  # ranks moved: the test exercised growth and truncation


# ---- retraction (train_bases): orthonormal again, dW unchanged ----------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retract_restores_orthonormal_bases_and_keeps_dw(layout, dtype):
    core, bases, ranks = make_adapter(layout, dtype, seed=11)
    gen = torch.Generator().manual_seed(12)
    for basis, r in zip(bases, ranks):  # what some optimizer steps do to free factors: drift off orthonormality
        basis[:, :r] += 0.2 * torch.randn(basis[:, :r].shape, generator=gen, dtype=torch.float64).to(dtype)
    assert max(ortho_error(b, r) for b, r in zip(bases, ranks)) > 1e-2
    before = active_dense(core, bases, ranks)
    retract(core, bases, ranks)
    torch.testing.assert_close(active_dense(core, bases, ranks), before, **tol(dtype))
    assert all(ortho_error(b, r) < ORTHONORMALITY_TOL for b, r in zip(bases, ranks))
    assert outside_is_zero(core, bases, ranks)
