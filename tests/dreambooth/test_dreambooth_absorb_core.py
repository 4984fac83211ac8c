"""`--absorb_core` in the DreamBooth loop: the attention adapters train folded (K = U C and V), the convs in the Tucker
form; a resumed run continues bit-identically and both exports reproduce the trained adapter."""

from __future__ import annotations

import json
import shutil

import torch
from checkpointing import ADAPTER_FILE
from dreambooth_fixtures import train_args
from export_diffusers import DIFFUSERS_WEIGHT_NAME, load_adapter
from safetensors.torch import load_file

import tucker_lora
from tests.tolerances import assert_close

# augment after step 2, truncate after step 4, ...: checkpoint-3 is mid-cycle, with the cores folded
SCHEDULE = ["--augment_start_step", "2", "--core_steps", "2", "--tau", "0.3", "--max_train_steps", "6"]


def test_folded_training_resumes_bit_identically_and_exports(tiny_base, instance_dir, tmp_path):
    import train_dreambooth
    from diffusers import UNet2DConditionModel

    out = tmp_path / "out"
    args = train_args(tiny_base, instance_dir, out, *SCHEDULE, "--absorb_core", "--checkpointing_steps", "3")
    metrics = train_dreambooth.main(args)
    assert json.loads((out / "metrics.json").read_text())["absorb_core"] is True
    assert {tuple(r) for r in metrics["final_ranks"].values()} != {(4, 4)}, "no rank changed in 6 steps"

    # mid-cycle checkpoint: the attention cores are folded (the identity), the convs' are not
    saved = load_file(out / "checkpoint-3" / ADAPTER_FILE)
    attention_cores = [v for k, v in saved.items() if ".to_q." in k and "tucker_core" in k]
    conv_cores = [v for k, v in saved.items() if ".conv1." in k and "tucker_core" in k]
    assert attention_cores and conv_cores
    for core in attention_cores:
        rank = int((core.abs().sum(dim=1) > 0).sum())
        assert torch.equal(core[:rank, :rank], torch.eye(rank)), "an attention core was not folded"
    assert all(core.ndim == 4 and core.abs().sum() > 0 for core in conv_cores)  # kernel modes: nothing to fold into

    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed_out / "checkpoint-3")
    resumed_args = [a if a != str(out) else str(resumed_out) for a in args]
    resumed = train_dreambooth.main([*resumed_args, "--resume_from_checkpoint", "latest"])
    assert resumed["history"] == metrics["history"]
    assert resumed["final_ranks"] == metrics["final_ranks"]
    expected, actual = (
        load_file(out / "checkpoint-6" / ADAPTER_FILE),
        load_file(resumed_out / "checkpoint-6" / ADAPTER_FILE),
    )
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)

    # the final adapter is in the Tucker form: the PEFT folder and the diffusers file give the same UNet
    generator = torch.Generator().manual_seed(0)
    base = UNet2DConditionModel.from_pretrained(tiny_base / "unet").eval()
    inputs = {
        "sample": torch.randn(2, base.config.in_channels, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 3, base.config.cross_attention_dim, generator=generator),
    }
    with torch.no_grad():
        reference = base(**inputs).sample
        tucker_unet = load_adapter(
            UNet2DConditionModel.from_pretrained(tiny_base / "unet").eval(), out / "tucker_adapter"
        )
        assert tucker_lora.get_ranks(tucker_unet) == metrics["final_ranks"]
        adapted = tucker_unet(**inputs).sample
        stock = UNet2DConditionModel.from_pretrained(tiny_base / "unet").eval()
        stock.load_lora_adapter(str(out), weight_name=DIFFUSERS_WEIGHT_NAME, prefix="unet")
        exported = stock(**inputs).sample
    assert (adapted - reference).abs().max() > 0  # the trained adapter changes the output
    assert_close(exported, adapted)
