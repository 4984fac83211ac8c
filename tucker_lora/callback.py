"""`TuckerRankCallback`: runs `TuckerRankUpdater` inside a `transformers.Trainer` (the only module importing it).

Trainer's order on every optimizer step: gradient clipping, `on_pre_optimizer_step` (-> `before_step`),
`optimizer.step()`, `on_optimizer_step` (-> `after_step`, gradients accumulated over the micro-batches and
all-reduced), scheduler, `zero_grad`. `on_substep_end` (per micro-batch) is not used.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .distributed import check_no_parameter_sharding
from .rank_updater import TuckerRankUpdater


class TuckerRankCallback(TrainerCallback):
    """
    Adapts the ranks of every Tucker adapter while a `Trainer` trains, once per optimizer step.

    The logic lives in [`TuckerRankUpdater`]; this callback only forwards the Trainer's events to it, truncates any
    adapter that is mid-cycle when training ends, and adds the settled ranks per module (`tucker_rank/<module>/<mode>`)
    and the active parameter count (`tucker_active_params`) to every log (so `trainer.state.log_history`,
    `trainer_state.json` and [`plot_ranks`] see them). The same values also go into the log history at the start of
    training and at every step that changed them, so that the rank plot shows each truncation even between logging
    steps. Trainer calls the `report_to` integrations (TensorBoard, W&B) before the callbacks passed in
    `callbacks=[...]`; use `attach(trainer)` for them to log the ranks too. FSDP and DeepSpeed are rejected when
    training starts.

    Args:
        adapter_names (`str` or `list[str]`, *optional*): the adapters to update; defaults to every trainable Tucker
            adapter.

    Example:

    ```python
    trainer = Trainer(
        model=get_peft_model(base, TuckerAdapterConfig(tau=0.1)), args=args, train_dataset=data,
        callbacks=[TuckerRankCallback()],
    )
    trainer.train()
    ```
    """

    def __init__(self, adapter_names: str | list[str] | None = None) -> None:
        self.adapter_names = adapter_names
        self.updater: TuckerRankUpdater | None = None
        self._recorded: dict[str, float] | None = None
        self._truncations_seen = 0

    def attach(self, trainer: Any) -> TuckerRankCallback:
        """Puts this callback first in `trainer`'s callbacks (instead of `callbacks=[...]`, which comes after the
        `report_to` integrations), so that TensorBoard, W&B and the other loggers receive the rank metrics too.

        Example:

        ```python
        trainer = Trainer(model=model, args=TrainingArguments(..., report_to="tensorboard"), train_dataset=data)
        TuckerRankCallback().attach(trainer)
        trainer.train()
        ```
        """
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [self] + [cb for cb in callbacks if cb is not self]
        return self

    def _updater(self, state: TrainerState, model: Any, optimizer: Any) -> TuckerRankUpdater:
        if self.updater is None:
            self.updater = TuckerRankUpdater(model, optimizer, self.adapter_names, total_steps=state.max_steps)
        self.updater.step = state.global_step  # not yet incremented inside the optimizer hooks; right on resume
        return self.updater

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        check_no_parameter_sharding(kwargs.get("model"), args)
        self.updater = None
        updater = self._updater(state, kwargs["model"], kwargs.get("optimizer"))
        self._recorded, self._truncations_seen = None, updater.truncations
        if state.global_step == 0:
            self._record_ranks(state)  # the initial ranks; a resumed history has its own entries up to here
        else:
            self._recorded = updater.metrics()

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._updater(state, kwargs["model"], kwargs.get("optimizer")).before_step()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._updater(state, kwargs["model"], kwargs.get("optimizer")).after_step()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # only after a truncation: the settled ranks change nowhere else, and metrics() walks every layer
        if self.updater is not None and self.updater.truncations != self._truncations_seen:
            self._truncations_seen = self.updater.truncations
            self._record_ranks(state)

    def _record_ranks(self, state: TrainerState) -> None:
        """Appends the settled ranks to the log history when they differ from the last ones appended: with ranks
        that change only at truncations, a plot of the logging steps alone can miss every change (the main GLUE
        command's one truncation, at step 20, comes before its first log, at step 25)."""
        metrics = self.updater.metrics()
        if metrics != self._recorded:
            self._recorded = metrics
            state.log_history.append({"step": state.global_step, **metrics})

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.updater is None or logs is None:
            return
        metrics = self.updater.metrics()
        logs.update(metrics)
        # Trainer appended a copy of `logs` to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.updater is not None:
            self.updater.step = state.global_step
            self.updater.finalize()
