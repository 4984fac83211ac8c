"""`absorb_core`: matrix adapters kept folded (`K = U C`, core fixed at I) between cycle events; convs unfolded."""

from __future__ import annotations

import pytest
import torch

from tests.test_rank_updater import batch, layers, make, train
from tests.tolerances import ORTHONORMALITY_TOL, assert_close
from tucker_lora import TuckerAdapterConfig
from tucker_lora.absorbed_core import fold, fold_tensors
from tucker_lora.batched_cycle import LayerBatch
from tucker_lora.rank_updater import TuckerRankUpdater

SCHEDULE = {"absorb_core": True, "augment_start_step": 2, "core_steps": 3, "r_max": 4, "tau": 0.05}


def identity_block(layer) -> bool:
    r_out, r_in = layer.active_ranks("default")
    core = layer.tucker_core["default"]
    eye = torch.zeros_like(core)
    eye[:r_in, :r_in] = torch.eye(r_in)
    return r_out == r_in and torch.equal(core, eye)


def output(model, step: int = 99) -> torch.Tensor:
    x, image, _ = batch(step)
    with torch.no_grad():
        return model(x, image)


def test_fold_keeps_the_update_and_the_batched_fold_equals_the_per_layer_one():
    gen = torch.Generator().manual_seed(0)
    cores, bases = [], []
    for ranks in ([3, 2], [2, 4]):
        core, basis = torch.zeros(6, 6), torch.zeros(10, 6)
        core[: ranks[0], : ranks[1]] = torch.randn(ranks[0], ranks[1], generator=gen)
        basis[:, : ranks[0]] = torch.randn(10, ranks[0], generator=gen)
        cores.append(core)
        bases.append(basis)
    before = [b @ c for b, c in zip(bases, cores)]  # dW = U C V^T: the fold must keep U C
    expected = [(c.clone(), b.clone()) for c, b in zip(cores, bases)]
    new_ranks = [fold_tensors(c, b, r) for (c, b), r in zip(expected, ([3, 2], [2, 4]))]
    assert new_ranks == [[2, 2], [4, 4]]
    for (core, basis), dw, (_, r_in) in zip(expected, before, new_ranks):
        assert_close(basis @ core, dw)
        assert torch.equal(core[:r_in, :r_in], torch.eye(r_in)) and core.abs().sum() == r_in
        assert (basis[:, r_in:] == 0).all()

    model, _ = make(**SCHEDULE)
    lin = layers(model)[0]
    lin.set_active_ranks("default", [3, 2])
    core, basis = lin.tucker_core["default"].data, lin.tucker_bases["default"][0].data
    with torch.no_grad():
        core.zero_()
        core[:3, :2] = cores[0][:3, :2]
        basis.zero_()
        basis[:, :3] = torch.randn(basis.shape[0], 3, generator=gen)
    reference = (core.clone(), basis.clone())
    fold_tensors(*reference, [3, 2])
    fold(LayerBatch([lin], "default"))
    assert lin.active_ranks("default") == [2, 2]
    assert_close(lin.tucker_bases["default"][0].data, reference[1])
    assert torch.equal(lin.tucker_core["default"].data, reference[0])


def test_a_folded_adapter_starts_at_zero_update_and_only_matrix_cores_fold():
    model, _ = make(**SCHEDULE)
    lin, conv = layers(model)
    assert identity_block(lin)
    assert (lin.tucker_bases["default"][0] == 0).all()  # K = U C = 0: the output is the base model's
    u_in = lin.tucker_bases["default"][1][:, :2].double()
    assert (u_in.T @ u_in - torch.eye(2, dtype=torch.float64)).abs().max() < ORTHONORMALITY_TOL
    assert (conv.tucker_core["default"] == 0).all()  # a conv's core has kernel modes: Tucker form
    base, _ = make(**{**SCHEDULE, "absorb_core": False})
    with base.disable_adapter():
        assert_close(output(model), output(base))


def test_training_steps_k_and_v_and_every_event_folds_again_without_changing_the_output():
    model, opt = make(**SCHEDULE)
    updater = TuckerRankUpdater(model, opt)
    lin, conv = layers(model)
    for step in range(12):  # augmentations end steps 2, 6, 10; truncations end 5, 9
        x, image, target = batch(step)
        ((model(x, image) - target) ** 2).mean().backward()
        updater.before_step()
        assert lin.tucker_core["default"].grad is None  # the folded core is never stepped
        assert conv.tucker_core["default"].grad is not None
        assert all(b.grad is not None for b in lin.tucker_bases["default"])
        opt.step()
        stepped = output(model)
        action = updater.groups[0].action(step + 1, None)
        updater.after_step()
        opt.zero_grad()
        assert identity_block(lin), step
        if action == "augment":  # retraction, augmentation and fold all keep dW
            assert_close(output(model), stepped)
    assert lin.active_ranks("default") != [2, 2] or conv.active_ranks("default") != [2, 2]
    updater.finalize()
    for layer in (lin, conv):  # finalize leaves the Tucker form, orthonormal bases
        for basis, rank in zip(layer.tucker_bases["default"], layer.active_ranks("default")):
            u = basis[:, :rank].double()
            assert (u.T @ u - torch.eye(rank, dtype=torch.float64)).abs().max() < ORTHONORMALITY_TOL


def test_folded_training_learns_as_well_as_the_tucker_form():
    """Same toy problem and schedule (the frozen head bounds what any adapter reaches): the last ten losses fall below
    the first ten in both forms, the folded one within 10% of the Tucker form's."""
    last = {}
    for absorb in (True, False):
        model, opt = make(**{**SCHEDULE, "absorb_core": absorb})
        losses = train(model, opt, TuckerRankUpdater(model, opt), 60)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert sum(losses[-10:]) < 0.9 * sum(losses[:10])
        last[absorb] = sum(losses[-10:])
    assert last[True] < 1.1 * last[False]


def test_in_basis_lr_ratio_trains_as_a_parameter_group_for_v_at_that_ratio():
    """AdamW with `in_basis_lr_ratio=q` takes the steps of `in_basis_lr_ratio=1` with the folded V in a parameter
    group at `q` times the learning rate, through augmentations, truncations and folds; the conv (Tucker form) and
    K are stepped as before."""
    ratio, steps = 3.0, 12  # augmentations end steps 2, 6, 10; truncations 5, 9
    model, opt = make(**SCHEDULE, in_basis_lr_ratio=ratio)
    reference, _ = make(**SCHEDULE)
    in_basis = layers(reference)[0].tucker_bases["default"][1]
    rest = [p for p in reference.parameters() if p.requires_grad and p is not in_basis]
    grouped = torch.optim.AdamW(
        [{"params": rest}, {"params": [in_basis], "lr": 1e-2 * ratio}], lr=1e-2, weight_decay=0.1
    )
    losses = train(model, opt, TuckerRankUpdater(model, opt), steps)
    expected = train(reference, grouped, TuckerRankUpdater(reference, grouped), steps)
    assert_close(torch.tensor(losses), torch.tensor(expected))
    for layer, ref in zip(layers(model), layers(reference)):
        assert layer.active_ranks("default") == ref.active_ranks("default")
        assert_close(layer.tucker_core["default"].data, ref.tucker_core["default"].data)
        for basis, ref_basis in zip(layer.tucker_bases["default"], ref.tucker_bases["default"]):
            assert_close(basis.data, ref_basis.data)
    plain, plain_opt = make(**SCHEDULE)  # the ratio changes the run (else the comparison above proves nothing)
    unscaled = train(plain, plain_opt, TuckerRankUpdater(plain, plain_opt), steps)
    assert abs(unscaled[-1] - losses[-1]) > 1e-3 * abs(unscaled[-1])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"absorb_core": 1}, "`absorb_core` must be True or False"),
        ({"absorb_core": True, "train_bases": False}, "`absorb_core=True` needs `train_bases=True`"),
        ({"absorb_core": True, "in_basis_lr_ratio": 0.0}, r"`in_basis_lr_ratio` must be a finite number > 0; got 0.0"),
        (
            {"absorb_core": True, "in_basis_lr_ratio": True},
            r"`in_basis_lr_ratio` must be a finite number > 0; got True",
        ),
        (
            {"in_basis_lr_ratio": 2.0},
            r"`in_basis_lr_ratio` applies to folded adapters only and needs `absorb_core=True`",
        ),
    ],
)
def test_bad_absorb_core_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TuckerAdapterConfig(**kwargs)
