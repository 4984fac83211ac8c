"""TuckerRankCallback under transformers.Trainer: once per optimizer step, logs and plots, finalize, resume, errors."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from transformers import Trainer

from tests.ddp.task import adapter_state, dataset, training_args, tucker_model
from tests.tolerances import tol
from tucker_lora import TuckerLayer
from tucker_lora import rank_updater as rank_updater_module
from tucker_lora.callback import TuckerRankCallback
from tucker_lora.plotting import budget_series, plot_ranks, rank_series
from tucker_lora.rank_updater import watch_rank_updates


def layers(model):
    return [m for m in model.modules() if isinstance(m, TuckerLayer)]


class CountingCallback(TuckerRankCallback):
    """Counts the calls that reach the updater."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"before": 0, "after": 0}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.calls["before"] += 1
        return super().on_pre_optimizer_step(args, state, control, **kwargs)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.calls["after"] += 1
        return super().on_optimizer_step(args, state, control, **kwargs)


def test_trainer_run_adapts_ranks_once_per_optimizer_step_and_logs_them(tmp_path):
    model = tucker_model()
    callback = CountingCallback()
    args = training_args(str(tmp_path), max_steps=30, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback])
    trainer.train()
    # 30 optimizer steps of 2 micro-batches each: the updater ran 30 times, not 60
    assert callback.calls == {"before": 30, "after": 30}
    assert callback.updater.step == 30
    ranks, active = rank_series(trainer.state.log_history)
    assert set(ranks) == {"inp/out", "inp/in", "conv/out", "conv/in"}
    # one point per optimizer step (and step 0, the initial ranks), + the summary
    assert [step for step, _ in active][:31] == list(range(0, 31))
    assert any(len({value for _, value in points}) > 1 for points in ranks.values())  # ranks changed in the run
    # the final ranks are settled (after training ended, finalize truncated): within [r_min, r_max]
    for layer in layers(model):
        assert all(1 <= r <= 4 for r in layer.active_ranks("default"))
    png = plot_ranks(trainer.state.log_history, tmp_path / "ranks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_rank_changes_between_logging_steps_reach_the_log_history(tmp_path):
    """Logging every 10 steps, the history still holds the initial ranks (step 0) and every step that changed them,
    with the values that a run logging every step has at those steps."""

    def ranks_logged(name, logging_steps):
        args = training_args(str(tmp_path / name), max_steps=12, logging_steps=logging_steps)
        trainer = Trainer(model=tucker_model(), args=args, train_dataset=dataset(), callbacks=[TuckerRankCallback()])
        trainer.train()
        return rank_series(trainer.state.log_history)[0]

    every_step, sparse = ranks_logged("every_step", 1), ranks_logged("sparse", 10)
    assert set(sparse) == set(every_step)
    changed_somewhere = False
    for key, points in every_step.items():
        truth, recorded = dict(points), dict(sparse[key])
        assert recorded[0] == truth[0] == 2, key  # r=2 at the start
        changes = {step for step in truth if step > 0 and truth[step] != truth[step - 1]}
        changed_somewhere |= bool(changes)
        assert changes <= set(recorded), key  # every change is in the sparse history...
        assert {step: truth[step] for step in recorded} == recorded, key  # ...with the right value
        assert len(recorded) < len(truth)  # and the sparse history did not log every step
    assert changed_somewhere


def test_loss_decreases_on_a_small_task(tmp_path):
    """Mean training loss of the last 10 of 60 steps is below half the first 10's (a nonlinear teacher, Adam)."""
    trainer = Trainer(
        model=tucker_model(), args=training_args(str(tmp_path), max_steps=60, learning_rate=3e-2),
        train_dataset=dataset(), callbacks=[TuckerRankCallback()],
    )  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_training_ends_on_a_truncated_adapter(tmp_path):
    """core_steps=4, augmentation after step 2: after step 8 the adapter is augmented (mid-cycle); on_train_end
    truncates it, so no unvetted direction is kept."""
    model = tucker_model(core_steps=4, r_max=3)
    seen = {}

    class Spy(TuckerRankCallback):
        def on_train_end(self, args, state, control, **kwargs):
            seen["widths"] = [layer.active_ranks("default") for layer in layers(model)]
            return super().on_train_end(args, state, control, **kwargs)

    trainer = Trainer(model=model, args=training_args(str(tmp_path), max_steps=8), train_dataset=dataset(),
                      callbacks=[Spy()])  # fmt: skip
    trainer.train()
    assert any(max(w) > 3 for w in seen["widths"])  # mid-cycle at the end: augmented beyond r_max
    assert all(max(layer.active_ranks("default")) <= 3 for layer in layers(model))


@pytest.mark.parametrize(
    "budget",
    [{}, {"tau": 0.01, "param_budget": 110, "budget_ramp": 1.0}, {"absorb_core": True}],
    ids=["tau", "budget", "absorb_core"],
)
def test_resume_after_rank_changes_matches_a_straight_run(tmp_path, budget):
    """16 steps straight vs 7 steps + resume_from_checkpoint for 9 more (checkpoint mid-cycle): same ranks and
        tensors within float32 tolerance; with a parameter budget reached at the end of the run too (the checkpoint is
    mid-ramp)."""
    straight = tucker_model(core_steps=3, **budget)
    trainer = Trainer(model=straight, args=training_args(str(tmp_path / "a"), max_steps=16), train_dataset=dataset(),
                      callbacks=[TuckerRankCallback()])  # fmt: skip
    trainer.train()
    expected = adapter_state(straight, trainer.optimizer)
    straight_logs = {e["step"]: e for e in trainer.state.log_history if "tucker_active_params" in e}

    first = tucker_model(core_steps=3, **budget)
    args = training_args(str(tmp_path / "b"), max_steps=16, save_strategy="steps", save_steps=7)
    Trainer(model=first, args=args, train_dataset=dataset(), callbacks=[TuckerRankCallback()]).train()
    resumed = tucker_model(core_steps=3, **budget)
    trainer = Trainer(model=resumed, args=args, train_dataset=dataset(), callbacks=[TuckerRankCallback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-7"))
    got = adapter_state(resumed, trainer.optimizer)
    if "param_budget" in budget:  # the budget schedule and what it let through continue as in the straight run
        # The resumed history starts with the checkpoint's steps 0-7; step 8 logs before the next truncation (at
        # 9), with the budget of the one at step 5 but the augmented ranks, as any resume mid-cycle.
        logged = {e["step"]: e for e in trainer.state.log_history if "tucker_active_params" in e}
        assert sorted(logged) == list(range(0, 17))  # step 0: the initial ranks, recorded at the start
        for step in range(8, 17):
            assert logged[step]["tucker_param_budget"] == straight_logs[step]["tucker_param_budget"], step
        for step in range(9, 17):
            active = logged[step]["tucker_active_params"]
            assert active == straight_logs[step]["tucker_active_params"] <= logged[step]["tucker_param_budget"]
        assert logged[9]["tucker_param_budget"] > logged[13]["tucker_param_budget"] > 110  # mid-ramp
    # the checkpoint's trainer_state.json holds the rank logs that plot_ranks reads
    assert plot_ranks(tmp_path / "b" / "checkpoint-7", tmp_path / "ranks.png").stat().st_size > 5000
    assert set(got) == set(expected)
    for key, value in expected.items():
        if key.endswith(".ranks"):
            assert torch.equal(got[key], value), key
        else:
            torch.testing.assert_close(got[key], value, **tol(torch.float32), msg=key)
    assert any(
        not torch.equal(value, torch.tensor([2, 2])) for key, value in expected.items() if key.endswith("ranks")
    )


def test_missing_callback_warns_under_trainer(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_updater_module, "MISSING_UPDATER_STEPS", 10)
    monkeypatch.setattr(rank_updater_module, "_warned_missing_updater", False)
    monkeypatch.setattr(rank_updater_module, "_unmanaged_steps", 0)
    model = tucker_model()
    for layer in layers(model):
        watch_rank_updates(layer, "default")
    trainer = Trainer(model=model, args=training_args(str(tmp_path), max_steps=12), train_dataset=dataset())
    with pytest.warns(UserWarning, match="without any rank update"):
        trainer.train()
    monkeypatch.setattr(rank_updater_module, "_warned_missing_updater", False)
    monkeypatch.setattr(rank_updater_module, "_unmanaged_steps", 0)
    model = tucker_model()
    for layer in layers(model):
        watch_rank_updates(layer, "default")
    trainer = Trainer(model=model, args=training_args(str(tmp_path), max_steps=12), train_dataset=dataset(),
                      callbacks=[TuckerRankCallback()])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "without any rank update" in str(w.message)]


@pytest.mark.parametrize(
    "fsdp,deepspeed,message", [("full_shard", None, "FSDP"), ("", {"zero_optimization": {"stage": 3}}, "DeepSpeed")]
)
def test_sharded_training_is_rejected_at_train_begin(fsdp, deepspeed, message):
    args = types.SimpleNamespace(fsdp=fsdp, deepspeed=deepspeed)
    state = types.SimpleNamespace(global_step=0, max_steps=10)
    with pytest.raises(ValueError, match=f"{message}.*not supported|not supported.*{message}"):
        TuckerRankCallback().on_train_begin(args, state, None, model=tucker_model(), optimizer=None)


def test_attach_puts_the_rank_metrics_before_the_loggers(tmp_path):
    """A logger registered before the callback (as `report_to` integrations are) sees the metrics after attach()."""
    from transformers import TrainerCallback

    class Logger(TrainerCallback):
        def __init__(self) -> None:
            self.keys: set[str] = set()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.keys |= set(logs)

    logger = Logger()
    trainer = Trainer(model=tucker_model(), args=training_args(str(tmp_path), max_steps=4), train_dataset=dataset(),
                      callbacks=[logger])  # fmt: skip
    TuckerRankCallback().attach(trainer)
    assert isinstance(trainer.callback_handler.callbacks[0], TuckerRankCallback)
    trainer.train()
    assert {"tucker_rank/inp/out", "tucker_active_params"} <= logger.keys


def test_plot_ranks_draws_the_budget_over_the_active_parameters(tmp_path, monkeypatch):
    model = tucker_model(tau=0.01, param_budget=110, budget_ramp=0.5)
    trainer = Trainer(model=model, args=training_args(str(tmp_path)), train_dataset=dataset(),
                      callbacks=[TuckerRankCallback()])  # fmt: skip
    trainer.train()
    budget = budget_series(trainer.state.log_history)
    assert budget[0][1] > 110 and budget[-1][1] == 110  # the ramp, then the budget
    import matplotlib.figure

    drawn = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig) or save(fig, *a, **k)
    )
    png = plot_ranks(trainer.state.log_history, tmp_path / "ranks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bottom = drawn[0].axes[1]
    lines = {line.get_label(): line for line in bottom.get_lines()}
    assert list(lines["param_budget"].get_ydata()) == [value for _, value in budget]
    assert lines["param_budget"].get_linestyle() == "--"
    # from the first truncation (step 4) on, the active count is under the budget line at every logged step
    active = dict(zip(lines["active"].get_xdata(), lines["active"].get_ydata()))
    assert all(active[step] <= value for step, value in budget if step >= 4)
