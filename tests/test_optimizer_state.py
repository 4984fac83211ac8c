"""The core's optimizer state follows the rank-adaptive cycle (METHOD section 9, item 9)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.tolerances import tol
from tucker_lora import optimizer_state
from tucker_lora.optimizer_state import state_after_augment, state_after_truncate, unwrap_optimizer
from tucker_lora.rank_ops import augment, truncate

OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01),
    "adam_amsgrad": lambda p: torch.optim.Adam([p], lr=1e-2, amsgrad=True),
    "sgd_momentum": lambda p: torch.optim.SGD([p], lr=1e-2, momentum=0.9),
}
FIRST = {"adamw": ["exp_avg"], "adam_amsgrad": ["exp_avg"], "sgd_momentum": ["momentum_buffer"]}
SECOND = {"adamw": ["exp_avg_sq"], "adam_amsgrad": ["exp_avg_sq", "max_exp_avg_sq"], "sgd_momentum": []}


class Wrapper:
    """Stands for accelerate's AcceleratedOptimizer: the torch optimizer is `.optimizer`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


def trained_core(name: str, ranks=(3, 2), caps=(6, 6), rest=(3, 3), steps: int = 5, seed: int = 0):
    """A conv-shaped core at capacity, an optimizer that stepped it `steps` times on gradients in the active block."""
    gen = torch.Generator().manual_seed(seed)
    core = torch.nn.Parameter(torch.zeros(*caps, *rest))
    block = tuple(slice(0, r) for r in ranks)
    with torch.no_grad():
        core[block] = torch.randn(core[block].shape, generator=gen)
    optimizer = OPTIMIZERS[name](core)
    for _ in range(steps):
        core.grad = torch.zeros_like(core)
        core.grad[block] = torch.randn(core[block].shape, generator=gen)
        optimizer.step()
    return core, optimizer


def bases_for(core: torch.Tensor, ranks, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    bases = []
    for n, cap, r in zip((9, 8), core.shape[:2], ranks):
        basis = torch.zeros(n, cap)
        basis[:, :r] = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0].float()
        bases.append(basis)
    return bases


def outside(t: torch.Tensor, ranks) -> torch.Tensor:
    masked = t.clone()
    masked[tuple(slice(0, r) for r in ranks)] = 0
    return masked


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("wrapped", [False, True])
def test_augmented_entries_start_at_zero(name, wrapped):
    ranks = [3, 2]
    core, optimizer = trained_core(name, ranks)
    state = optimizer.state[core]
    for key in FIRST[name] + SECOND[name]:
        state[key] += 1.0  # stale values everywhere, also outside the active block
    before = {key: state[key].clone() for key in FIRST[name] + SECOND[name]}
    bases = bases_for(core, ranks)
    widths = augment(core.data, bases, ranks, [torch.randn(b.shape) for b in bases])
    assert widths == [6, 4]
    state_after_augment(Wrapper(optimizer) if wrapped else optimizer, core, ranks)
    block = tuple(slice(0, r) for r in ranks)
    for key in FIRST[name] + SECOND[name]:
        assert outside(state[key], ranks).abs().max() == 0
        assert torch.equal(state[key][block], before[key][block])
        assert before[key][block].abs().min() > 0


def mode_rotate(t: torch.Tensor, rotations, square: bool) -> torch.Tensor:
    """The reference transform, written with einsum for the 2 channel modes of a conv-shaped tensor."""
    p0, p1 = (r.double() * r.double() if square else r.double() for r in rotations)
    return torch.einsum("abhw,ai,bj->ijhw", t.double(), p0, p1)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_truncation_rotates_the_moments_with_the_core(name):
    ranks = [3, 2]
    core, optimizer = trained_core(name, ranks)
    bases = bases_for(core, ranks)
    widths = augment(core.data, bases, ranks, [torch.randn(b.shape) for b in bases])
    state_after_augment(optimizer, core, ranks)
    for _ in range(3):  # Galerkin steps on the augmented core
        core.grad = torch.zeros_like(core)
        core.grad[tuple(slice(0, w) for w in widths)] = torch.randn(widths + [3, 3])
        optimizer.step()
    state = optimizer.state[core]
    wblock = tuple(slice(0, w) for w in widths)
    before = {key: state[key][wblock].clone() for key in FIRST[name] + SECOND[name]}
    new_ranks, rotations = truncate(core.data, bases, widths, tau=0.2, r_min=1, r_max=8)
    assert any(r < w for r, w in zip(new_ranks, widths))  # something was cut and rotated
    state_after_truncate(optimizer, core, widths, rotations)
    block = tuple(slice(0, r) for r in new_ranks)
    for key in FIRST[name]:
        expected = mode_rotate(before[key], rotations, square=False)
        torch.testing.assert_close(state[key][block].double(), expected, **tol(torch.float32))
        assert outside(state[key], new_ranks).abs().max() == 0
    for key in SECOND[name]:
        expected = mode_rotate(before[key], rotations, square=True)
        torch.testing.assert_close(state[key][block].double(), expected, **tol(torch.float32))
        assert state[key].min() >= 0
        assert outside(state[key], new_ranks).abs().max() == 0
    if SECOND[name]:
        # Adam's normalized step stays bounded: m'^2 <= v' * sum(m^2 / v) entrywise (Cauchy-Schwarz, per mode)
        m, v = state["exp_avg"][block].double(), state["exp_avg_sq"][block].double()
        bound = (before["exp_avg"].double() ** 2 / before["exp_avg_sq"].double()).sum()
        assert (m**2 <= v * bound * (1 + 1e-4) + 1e-12).all()
    core.grad = torch.zeros_like(core)
    core.grad[block] = torch.randn(core[block].shape)
    optimizer.step()
    assert torch.isfinite(core).all()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_truncation_that_cuts_nothing_keeps_the_state(name):
    """A diagonal core with distinct values has P_i = signed identity: moments keep their values (first up to sign)."""
    core = torch.nn.Parameter(torch.zeros(4, 4))
    with torch.no_grad():
        core[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    optimizer = OPTIMIZERS[name](core)
    for _ in range(3):
        core.grad = torch.zeros_like(core)
        core.grad[:3, :3] = torch.randn(3, 3)
        optimizer.step()
        with torch.no_grad():  # keep the core diagonal and its order, so that P_i stays a signed identity
            core[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    bases = [torch.eye(5, 4), torch.eye(6, 4)]
    before = {key: optimizer.state[core][key].clone() for key in FIRST[name] + SECOND[name]}
    ranks, rotations = truncate(core.data, bases, [3, 3], tau=0.0, r_min=3, r_max=4)
    assert ranks == [3, 3]
    state_after_truncate(optimizer, core, [3, 3], rotations)
    for key in FIRST[name]:
        torch.testing.assert_close(optimizer.state[core][key].abs(), before[key].abs(), **tol(torch.float32))
    for key in SECOND[name]:
        torch.testing.assert_close(optimizer.state[core][key], before[key], **tol(torch.float32))


def test_other_optimizers_are_reset_with_one_warning_per_class():
    optimizer_state._WARNED_CLASSES.discard(torch.optim.Adagrad)
    core = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.Adagrad([core], lr=0.1)
    core.grad = torch.randn(4, 4)
    optimizer.step()
    assert optimizer.state[core]
    with pytest.warns(UserWarning, match="Adagrad"):
        state_after_truncate(Wrapper(optimizer), core, [4, 4], [torch.eye(4)[:, :2], torch.eye(4)[:, :2]])
    assert not optimizer.state.get(core)
    core.grad = torch.randn(4, 4)
    optimizer.step()  # lazily re-initialized
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state_after_augment(optimizer, core, [2, 2])  # reset again, but no second warning
    assert not optimizer.state.get(core)


def test_empty_state_and_plain_sgd_are_left_alone():
    core = torch.nn.Parameter(torch.randn(4, 4))
    adam = torch.optim.AdamW([core])
    state_after_truncate(adam, core, [4, 4], [torch.eye(4), torch.eye(4)])  # before the first step
    assert not adam.state.get(core)
    sgd = torch.optim.SGD([core], lr=0.1)
    core.grad = torch.randn(4, 4)
    sgd.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state_after_truncate(sgd, core, [4, 4], [torch.eye(4), torch.eye(4)])


def test_unwrap_optimizer_rejects_other_objects():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        unwrap_optimizer(object())


def test_unwrap_accelerate_optimizer():
    """accelerate's AcceleratedOptimizer subclasses torch.optim.Optimizer but keeps its state in `.optimizer`."""
    from accelerate import Accelerator

    inner = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    wrapped = Accelerator(cpu=True).prepare_optimizer(inner)
    assert isinstance(wrapped, torch.optim.Optimizer)
    assert unwrap_optimizer(wrapped) is inner
    assert unwrap_optimizer(Wrapper(wrapped)) is inner


def trained_basis(name: str, n: int = 9, cap: int = 6, rank: int = 3, steps: int = 4, seed: int = 0):
    """A basis at capacity stepped `steps` times on gradients in its active columns (as with `train_bases`)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.nn.Parameter(torch.zeros(n, cap))
    with torch.no_grad():
        basis[:, :rank] = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))[0].float()
    optimizer = OPTIMIZERS[name](basis)
    for _ in range(steps):
        basis.grad = torch.zeros_like(basis)
        basis.grad[:, :rank] = torch.randn(n, rank, generator=gen)
        optimizer.step()
    return basis, optimizer


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_basis_state_new_columns_start_at_zero(name):
    basis, optimizer = trained_basis(name)
    state = optimizer.state[basis]
    for key in FIRST[name] + SECOND[name]:
        state[key] += 1.0  # stale values in every column
    before = {key: state[key].clone() for key in FIRST[name] + SECOND[name]}
    optimizer_state.basis_state_after_augment(Wrapper(optimizer), basis, 3)
    for key in FIRST[name] + SECOND[name]:
        assert state[key][:, 3:].abs().max() == 0
        assert torch.equal(state[key][:, :3], before[key][:, :3])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_basis_state_follows_the_truncation_rotation(name):
    basis, optimizer = trained_basis(name, rank=5)
    state = optimizer.state[basis]
    gen = torch.Generator().manual_seed(3)
    rotation = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0][:, :2]  # P[:, :r], r = 2
    before = {key: state[key][:, :5].double().clone() for key in FIRST[name] + SECOND[name]}
    optimizer_state.basis_state_after_truncate(optimizer, basis, 5, rotation)
    for key in FIRST[name]:
        torch.testing.assert_close(state[key][:, :2].double(), before[key] @ rotation, **tol(torch.float32))
        assert state[key][:, 2:].abs().max() == 0
    for key in SECOND[name]:
        expected = before[key] @ (rotation * rotation)
        torch.testing.assert_close(state[key][:, :2].double(), expected, **tol(torch.float32))
        assert state[key].min() >= 0 and state[key][:, 2:].abs().max() == 0
