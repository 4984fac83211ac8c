"""Mixed precision through the training loop on CPU (bf16 autocast): the adapter trains in float32 while the frozen
base is bf16, the loss stays finite, and validation mid-training neither casts the live UNet nor breaks training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from checkpointing import ADAPTER_FILE
from dreambooth_fixtures import train_args
from safetensors.torch import load_file


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state (mixed precision included) per process; these tests change it, so they start and
    end with a fresh one, as accelerate's own test cases do."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _dtypes(model) -> tuple[set, set]:
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    return trainable, frozen


@pytest.mark.parametrize("method", ["tucker", "lora"])
def test_bf16_training_keeps_float32_adapters_and_validation_casts_nothing(
    tiny_base, instance_dir, tmp_path, monkeypatch, method
):
    import train_dreambooth

    seen = []
    real_validation = train_dreambooth.run_validation

    def observed_validation(args, model, *rest, **kwargs):  # the real validation, with the dtypes around it
        before = _dtypes(model)
        path, images = real_validation(args, model, *rest, **kwargs)
        seen.append((before, _dtypes(model), path))
        return path, images

    monkeypatch.setattr(train_dreambooth, "run_validation", observed_validation)
    extra = [
        "--method", method, "--mixed_precision", "bf16", "--max_train_steps", "6", "--checkpointing_steps", "6",
        "--validation_prompt", "a photo of sks dog", "--validation_steps", "3", "--num_validation_images", "1",
        "--num_inference_steps", "2", "--heldout_image", "02.jpg", "--output_kohya_format",
    ]  # fmt: skip
    if method == "tucker":
        extra += ["--augment_start_step", "1", "--core_steps", "2", "--tau", "0.3"]
    out = tmp_path / "out"
    metrics = train_dreambooth.main(train_args(tiny_base, instance_dir, out, *extra))

    # validation at step 3 (mid-training) and at the end, each leaving every dtype as it found it
    assert [path.rsplit("/", 1)[-1] for *_, path in seen] == ["step-000003.png", "step-000006.png"]
    for before, after, _ in seen:
        assert before == after == ({torch.float32}, {torch.bfloat16})
    # training went on after the mid-training validation, with finite losses
    assert [e["step"] for e in metrics["history"]] == list(range(1, 7))
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["instance_loss"]) for e in metrics["history"])
    assert math.isfinite(metrics["heldout_loss"]) and math.isfinite(metrics["heldout_loss_base"])
    # the adapter moved (gradients flowed through the bf16 base into the float32 parameters)
    assert metrics["heldout_loss"] != metrics["heldout_loss_base"]
    # the files are written, in float32
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["versions"] and saved["outputs"]["validation"].endswith("step-000006.png")
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
                 f"{method}_adapter/adapter_model.safetensors", f"checkpoint-6/{ADAPTER_FILE}"):  # fmt: skip
        tensors = load_file(out / name)
        assert tensors and {t.dtype for t in tensors.values()} <= {torch.float32, torch.int64}, name
    optimizer = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=False)["state"]
    assert {v.dtype for state in optimizer.values() for k, v in state.items() if k != "step"} == {torch.float32}


def test_fp16_on_a_cpu_is_refused_by_name(tiny_base, instance_dir, tmp_path):
    import train_dreambooth

    if torch.cuda.is_available():
        pytest.skip("fp16 autocast exists on this machine's GPU")
    with pytest.raises(ValueError, match="`mixed_precision` 'fp16' needs autocast.*use 'bf16' on a CPU"):
        train_dreambooth.main(train_args(tiny_base, instance_dir, tmp_path / "out", "--mixed_precision", "fp16"))
