"""TuckerRankUpdater in a hand-written loop: schedule, bases never stepped, zero-core start, finalize, freezing."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn

from tests.tolerances import ORTHONORMALITY_TOL, assert_close
from tucker_lora import TuckerAdapterConfig, TuckerLayer
from tucker_lora import rank_updater as rank_updater_module
from tucker_lora.rank_updater import TuckerRankUpdater, watch_rank_updates


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.head(self.conv(image).mean(dim=(2, 3)))


def make(seed: int = 0, optimizer: str = "adamw", **config):
    torch.manual_seed(seed)
    defaults = {"r": 2, "r_max": 4, "tau": 0.05, "target_modules": ["lin", "conv"], "core_steps": 3}
    model = get_peft_model(Net(), TuckerAdapterConfig(**{**defaults, **config}))
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    return model, opt


def layers(model):
    return [m for m in model.modules() if isinstance(m, TuckerLayer)]


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    x, image = torch.randn(8, 12, generator=gen), torch.randn(8, 3, 5, 5, generator=gen)
    target = torch.sin(x[:, :10] * 2) + image.mean(dim=(1, 2, 3))[:, None]
    return x, image, target


def train(model, opt, updater, steps: int, start: int = 0, record=None) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        x, image, target = batch(step)
        loss = ((model(x, image) - target) ** 2).mean()
        loss.backward()
        updater.before_step()
        opt.step()
        updater.after_step()
        opt.zero_grad()
        losses.append(loss.item())
        if record is not None:
            record.append([tuple(layer.active_ranks("default")) for layer in layers(model)])
    return losses


def test_schedule_augments_then_truncates_every_core_steps_plus_one():
    """augment_start_step=2, core_steps=3: augment after steps 2, 6, 10; truncate after steps 5, 9, 13."""
    model, opt = make(augment_start_step=2, core_steps=3)
    updater = TuckerRankUpdater(model, opt)
    record: list = []
    train(model, opt, updater, 13, record=record)
    lin = [r[0] for r in record]  # ranks of the Linear after each step (step n is index n - 1)
    assert lin[0] == (2, 2)
    for n in (2, 6, 10):  # augmented: r < width <= 2r (capacity min(n_i, 2 * r_max) = 8 allows 2r)
        assert all(r < w <= 2 * r for w, r in zip(lin[n - 1], lin[n - 2]))
    for n in (3, 4, 5, 7, 8, 9, 11, 12):  # Galerkin steps keep the widths; truncations may only shrink them
        assert all(r <= w for r, w in zip(lin[n - 1], lin[n - 2]))
        assert (lin[n - 1] == lin[n - 2]) or n in (5, 9)
    assert max(lin[4]) <= 4 and max(lin[8]) <= 4  # truncated to at most r_max
    actions = [updater.groups[0].action(n, None) for n in range(1, 14)]
    assert actions == [
        None,
        "augment",
        None,
        None,
        "truncate",
        "augment",
        None,
        None,
        "truncate",
        "augment",
        None,
        None,
        "truncate",
    ]


def test_optimizer_never_steps_the_bases_without_train_bases():
    model, opt = make(optimizer="sgd", augment_start_step=1, core_steps=1, train_bases=False)
    updater = TuckerRankUpdater(model, opt)
    train(model, opt, updater, 2)  # step 1 augments, step 2 truncates
    bases = [b.detach().clone() for layer in layers(model) for b in layer.tucker_bases["default"]]
    x, image, target = batch(99)
    ((model(x, image) - target) ** 2).mean().backward()
    updater.step = 100  # an ordinary step (not in a cycle's augment/truncate position): bases must not move at all
    updater.groups[0].start = 1000
    updater.before_step()
    assert all(b.grad is None for layer in layers(model) for b in layer.tucker_bases["default"])
    opt.step()  # SGD with momentum and weight decay 0.1
    updater.after_step()
    after = [b.detach() for layer in layers(model) for b in layer.tucker_bases["default"]]
    assert all(torch.equal(a, b) for a, b in zip(after, bases))
    assert all(not opt.state.get(b) for layer in layers(model) for b in layer.tucker_bases["default"])


def test_train_bases_steps_active_columns_and_cycle_events_restore_orthonormality():
    """train_bases=True: the optimizer moves the active basis columns between cycle events (inactive ones stay zero),
    and every augmentation and truncation starts from orthonormal bases again, `dW` unchanged by that retraction."""
    model, opt = make(augment_start_step=2, core_steps=3, train_bases=True)
    updater = TuckerRankUpdater(model, opt)
    train(model, opt, updater, 5)  # augmented after 2, truncated after 5
    lin = layers(model)[0]
    before = [b.detach().clone() for b in lin.tucker_bases["default"]]
    train(model, opt, updater, 1, start=5)  # step 6: an ordinary step before the next augmentation's retraction
    assert updater.groups[0].augmented is True
    ranks = lin.active_ranks("default")
    for basis, rank in zip(lin.tucker_bases["default"], ranks):
        u = basis[:, :rank].double()
        assert (u.T @ u - torch.eye(rank, dtype=torch.float64)).abs().max() < ORTHONORMALITY_TOL
        assert (basis[:, rank:] == 0).all()
    x, image, target = batch(77)
    ((model(x, image) - target) ** 2).mean().backward()
    updater.before_step()  # step 7: an ordinary (Galerkin) step, the bases keep their gradients
    assert all(b.grad is not None for b in lin.tucker_bases["default"])
    opt.step()
    updater.after_step()
    opt.zero_grad()
    moved = [b.detach() for b in lin.tucker_bases["default"]]
    assert any(not torch.equal(a[:, :r], b[:, :r]) for a, b, r in zip(moved, before, ranks))
    assert all((b[:, r:] == 0).all() for b, r in zip(moved, ranks))
    drift = max(
        (b[:, :r].double().T @ b[:, :r].double() - torch.eye(r, dtype=torch.float64)).abs().max()
        for b, r in zip(moved, ranks)
    )
    assert drift > ORTHONORMALITY_TOL  # stepped as free factors: no longer orthonormal until the next event
    delta = lin.delta_weight("default").clone()
    updater._retract(updater.groups[0])
    assert_close(lin.delta_weight("default"), delta)
    for basis, rank in zip(lin.tucker_bases["default"], ranks):
        u = basis[:, :rank].double()
        assert (u.T @ u - torch.eye(rank, dtype=torch.float64)).abs().max() < ORTHONORMALITY_TOL


def test_orthonormality_and_finite_training_over_many_cycles():
    """core_steps=1 (a cycle every 2 steps), AdamW with weight decay 0.1: 200 cycles keep every basis orthonormal."""
    model, opt = make(augment_start_step=1, core_steps=1, r_max=3)
    updater = TuckerRankUpdater(model, opt)
    record: list = []
    losses = train(model, opt, updater, 400, record=record)
    assert all(torch.isfinite(torch.tensor(losses)))
    for layer in layers(model):
        for basis, rank in zip(layer.tucker_bases["default"], layer.active_ranks("default")):
            u = basis[:, :rank].double()
            assert (u.T @ u - torch.eye(rank, dtype=torch.float64)).abs().max() < ORTHONORMALITY_TOL
            assert (basis[:, rank:] == 0).all()
    assert len({r for step in record for r in step}) >= 3  # ranks moved


def test_zero_core_start_is_nan_free_and_grows_away_from_zero():
    model, opt = make(augment_start_step=1, core_steps=2)
    assert all(layer.tucker_core["default"].abs().sum() == 0 for layer in layers(model))
    updater = TuckerRankUpdater(model, opt)
    losses = train(model, opt, updater, 30)
    assert all(torch.isfinite(torch.tensor(losses)))
    for layer in layers(model):
        assert all(torch.isfinite(t).all() for t in [layer.tucker_core["default"], *layer.tucker_bases["default"]])
        assert layer.tucker_core["default"].abs().sum() > 0
        assert min(layer.active_ranks("default")) >= 1


def test_finalize_truncates_an_adapter_that_is_mid_cycle():
    model, opt = make(augment_start_step=2, core_steps=3)
    updater = TuckerRankUpdater(model, opt)
    train(model, opt, updater, 7)  # augmented after step 6: mid-cycle
    lin = layers(model)[0]
    widths = lin.active_ranks("default")
    assert all(w > r for w, r in zip(widths, updater.groups[0].settled["lin"]))
    assert max(widths) > 4  # more than r_max: unvetted directions are active
    updater.finalize()
    ranks = lin.active_ranks("default")
    assert max(ranks) <= 4 and updater.groups[0].settled["lin"] == ranks
    for basis, rank in zip(lin.tucker_bases["default"], ranks):
        u = basis[:, :rank].double()
        assert (u.T @ u - torch.eye(rank, dtype=torch.float64)).abs().max() < ORTHONORMALITY_TOL
        assert (basis[:, rank:] == 0).all()
    # after a truncation (not mid-cycle) finalize keeps the ranks and dW; with train_bases it re-orthonormalizes
    delta = [layer.delta_weight("default").clone() for layer in layers(model)]
    ranks_before = [layer.active_ranks("default") for layer in layers(model)]
    updater.finalize()
    updater.step = 9
    updater.finalize()
    assert [layer.active_ranks("default") for layer in layers(model)] == ranks_before
    for layer, expected in zip(layers(model), delta):
        assert_close(layer.delta_weight("default"), expected)


def test_freeze_ranks_after_stops_cycles():
    model, opt = make(augment_start_step=1, core_steps=1, freeze_ranks_after=4)
    updater = TuckerRankUpdater(model, opt)
    record: list = []
    train(model, opt, updater, 12, record=record)
    assert record[4:] == [record[4]] * 8  # cycles started at steps 1 and 3 only; ranks fixed from step 4 on
    with pytest.raises(ValueError, match="total_steps"):
        TuckerRankUpdater(*make(freeze_ranks_after=0.5))
    model, opt = make(augment_start_step=1, core_steps=1, freeze_ranks_after=0.5)
    assert TuckerRankUpdater(model, opt, total_steps=8).groups[0].freeze_step(8) == 4


def test_tau_warmup_ramps_the_tolerance_and_keeps_more_directions_early():
    model, opt = make(augment_start_step=1, core_steps=1, tau=0.4, tau_warmup=0.5)
    group = TuckerRankUpdater(model, opt, total_steps=20).groups[0]
    assert [group.tau(n, 20) for n in (1, 5, 10, 11, 20)] == pytest.approx([0.04, 0.2, 0.4, 0.4, 0.4])
    with pytest.raises(ValueError, match="total_steps"):
        TuckerRankUpdater(*make(tau_warmup=0.5))
    ranks = {}
    for warmup in (None, 12):
        model, opt = make(augment_start_step=1, core_steps=1, tau=0.4, tau_warmup=warmup)
        record: list = []
        train(model, opt, TuckerRankUpdater(model, opt), 6, record=record)
        ranks[warmup] = [sum(sum(r) for r in step) for step in record[1::2]]  # after each truncation
    assert all(w >= p for w, p in zip(ranks[12], ranks[None])) and ranks[12] != ranks[None]


def test_metrics_report_settled_ranks_and_active_parameters():
    model, opt = make(augment_start_step=2, core_steps=3)
    updater = TuckerRankUpdater(model, opt)
    train(model, opt, updater, 2)  # augmented, not yet truncated: metrics still show the settled ranks
    metrics = updater.metrics()
    assert metrics["tucker_rank/lin/out"] == 2 and metrics["tucker_rank/conv/in"] == 2
    # Linear 10x12 at rank (2, 2): 10*2 + 12*2 + 4; conv 6x3x3x3 at (2, 2): 6*2 + 3*2 + 4*9
    assert metrics["tucker_active_params"] == (20 + 24 + 4) + (12 + 6 + 36)


def test_missing_updater_warns(monkeypatch):
    monkeypatch.setattr(rank_updater_module, "MISSING_UPDATER_STEPS", 5)
    monkeypatch.setattr(rank_updater_module, "_warned_missing_updater", False)
    monkeypatch.setattr(rank_updater_module, "_unmanaged_steps", 0)
    model, opt = make()
    for layer in layers(model):
        watch_rank_updates(layer, "default")
    with pytest.warns(UserWarning, match="TuckerRankCallback"):
        for step in range(8):
            x, image, target = batch(step)
            ((model(x, image) - target) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
    monkeypatch.setattr(rank_updater_module, "_warned_missing_updater", False)
    monkeypatch.setattr(rank_updater_module, "_unmanaged_steps", 0)
    model, opt = make()
    for layer in layers(model):
        watch_rank_updates(layer, "default")
    updater = TuckerRankUpdater(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, updater, 8)


def test_rejects_models_without_tucker_adapters():
    with pytest.raises(ValueError, match="peft_config"):
        TuckerRankUpdater(Net(), None)


def test_accelerate_loop_with_gradient_accumulation():
    """An Accelerate loop (prepared model and optimizer, accumulation 2): the updater runs only where
    `sync_gradients` is true, once per optimizer step, and the cycle follows the optimizer steps."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model, opt = make(augment_start_step=2, core_steps=3)
        model, opt = accelerator.prepare(model, opt)
        updater = TuckerRankUpdater(model, opt)
        calls = 0
        for micro in range(20):
            with accelerator.accumulate(model):
                x, image, target = batch(micro)
                accelerator.backward(((model(x, image) - target) ** 2).mean())
                if accelerator.sync_gradients:
                    updater.before_step()
                    calls += 1
                opt.step()
                if accelerator.sync_gradients:
                    updater.after_step()
                opt.zero_grad()
        assert calls == 10 and updater.step == 10
        assert all(b.grad is None for layer in layers(model) for b in layer.tucker_bases["default"])
        # steps 2 and 6 augmented, 5 and 9 truncated, step 10 augmented: mid-cycle now, settled after finalize
        assert updater.groups[0].augmented is True
        updater.finalize()
        assert all(max(layer.active_ranks("default")) <= 4 for layer in layers(model))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
