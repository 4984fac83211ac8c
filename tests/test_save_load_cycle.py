"""Every adapter the library writes loads again with its own ranks and outputs: saves between augmentation and
truncation, Trainer checkpoints, and `load_adapter` of an older save (Trainer's `load_best_model_at_end`)."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel
from transformers import Trainer, TrainerCallback

import tucker_lora
from tests.ddp.task import Regressor, dataset, training_args, tucker_model
from tests.tolerances import tol
from tucker_lora import TuckerRankCallback, TuckerRankUpdater

PROBE = dataset(n=16, seed=5)


def outputs(model) -> torch.Tensor:
    batch = {k: torch.stack([row[k] for row in PROBE]) for k in ("x", "image")}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(**batch)["logits"]
    model.train(was_training)
    return out


def fresh_base() -> Regressor:
    torch.manual_seed(0)  # the base model of tucker_model(seed=0)
    return Regressor()


def train_steps(model, steps: int) -> TuckerRankUpdater:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    updater = TuckerRankUpdater(model, optimizer)
    data = dataset(n=steps * 8)
    for i in range(steps):
        rows = data[i * 8 : (i + 1) * 8]
        loss = model(**{k: torch.stack([row[k] for row in rows]) for k in rows[0]})["loss"]
        loss.backward()
        updater.before_step()
        optimizer.step()
        updater.after_step()
        optimizer.zero_grad()
    return updater


def test_adapter_saved_between_augmentation_and_truncation_loads_with_identical_outputs(tmp_path):
    # r = r_max = 2: augmentation doubles the ranks to 4 > r_max, truncation comes core_steps=4 steps later
    model = tucker_model(r=2, r_max=2, core_steps=4, augment_start_step=2)
    updater = train_steps(model, 3)
    assert updater.groups[0].augmented
    ranks = tucker_lora.get_ranks(model)
    assert max(max(r) for r in ranks.values()) > 2  # mid-cycle: above r_max
    expected = outputs(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base(), tmp_path)
    assert tucker_lora.get_ranks(loaded) == ranks
    torch.testing.assert_close(outputs(loaded), expected, **tol(torch.float32))


class RecordOutputsAtSave(TrainerCallback):
    """The model's outputs and ranks whenever Trainer writes a checkpoint, by checkpoint folder."""

    def __init__(self) -> None:
        self.saved: dict[str, tuple[torch.Tensor, dict]] = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.saved[folder] = (outputs(model), tucker_lora.get_ranks(model))


@pytest.mark.parametrize("absorb_core", [False, True])
def test_every_trainer_checkpoint_loads_with_its_outputs(tmp_path, absorb_core):
    # core_steps=3 after step 2: checkpoints at every step, several of them mid-cycle, the last one too (step 9);
    # with absorb_core the linear adapter is saved folded (K = U C, core I) at every step
    model = tucker_model(r=2, r_max=2, core_steps=3, absorb_core=absorb_core)
    recorder = RecordOutputsAtSave()
    args = training_args(str(tmp_path), max_steps=9, save_strategy="steps", save_steps=1)
    Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[TuckerRankCallback(), recorder]).train()
    assert len(recorder.saved) == 9
    assert any(max(max(r) for r in ranks.values()) > 2 for _, ranks in recorder.saved.values())
    for folder, (expected, ranks) in recorder.saved.items():
        loaded = PeftModel.from_pretrained(fresh_base(), folder)
        assert tucker_lora.get_ranks(loaded) == ranks, folder
        torch.testing.assert_close(outputs(loaded), expected, **tol(torch.float32), msg=folder)


def test_load_adapter_of_an_older_save_restores_its_ranks(tmp_path):
    model = tucker_model(r=2, r_max=4, core_steps=2)
    early_ranks, early = tucker_lora.get_ranks(model), outputs(model)
    model.save_pretrained(tmp_path / "early")
    train_steps(model, 7)  # augmentations and truncations: the ranks move
    model.save_pretrained(tmp_path / "late")  # writes the late ranks into the model's config
    assert tucker_lora.get_ranks(model) != early_ranks
    model.load_adapter(str(tmp_path / "early"), "default")
    assert tucker_lora.get_ranks(model) == early_ranks
    assert model.peft_config["default"].rank_pattern == early_ranks
    torch.testing.assert_close(outputs(model), early, **tol(torch.float32))


def test_trainer_load_best_model_at_end_holds_the_best_checkpoint(tmp_path):
    # the eval rows come from another teacher (seed 3): their loss grows as the model fits the training teacher,
    # so the best checkpoint is an early one
    model = tucker_model(r=2, r_max=4, core_steps=2)
    recorder = RecordOutputsAtSave()
    args = training_args(
        str(tmp_path), max_steps=12, save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False, learning_rate=3e-2,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(n=32, seed=3),
        callbacks=[TuckerRankCallback(), recorder],
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-12")
    best_outputs, best_ranks = recorder.saved[best]
    last_ranks = recorder.saved[os.path.join(str(tmp_path), "checkpoint-12")][1]
    assert best_ranks != last_ranks  # the case that failed: the live config held the last ranks
    assert tucker_lora.get_ranks(model) == best_ranks
    torch.testing.assert_close(outputs(model), best_outputs, **tol(torch.float32))
