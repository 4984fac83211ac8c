"""The diffusers-format file loads with stock diffusers (a process that never imports tucker_lora) and reproduces
the Tucker UNet, attention and convolutions; the PEFT-format adapter reloads with tucker_lora."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from dreambooth_fixtures import REPO, adapted_tiny_unet
from export_diffusers import DIFFUSERS_WEIGHT_NAME, load_adapter, save_adapter, save_diffusers_lora
from safetensors.torch import load_file

import tucker_lora
from tests.tolerances import assert_close


def test_diffusers_file_keys_and_stock_loader_reproduce_the_tucker_unet(tmp_path):
    unet, inputs = adapted_tiny_unet(tmp_path)
    with torch.no_grad():
        expected = unet(**inputs).sample
    path = save_diffusers_lora(unet, str(tmp_path / "out"), "tucker")
    tensors = load_file(path)
    assert all(key.startswith("unet.") and key.endswith((".lora_A.weight", ".lora_B.weight")) for key in tensors)
    conv_a = tensors["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"]
    assert conv_a.shape == (2, 8, 3, 3)  # rank min(2, 3): the 3x3 kernel stays in A, B is 1x1
    assert tensors["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"].shape == (8, 2, 1, 1)
    assert len(tensors) == 2 * len(tucker_lora.get_ranks(unet))
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained({str(tmp_path / "base")!r}).eval()
        unet.load_lora_adapter({str(tmp_path / "out")!r}, weight_name={DIFFUSERS_WEIGHT_NAME!r}, prefix="unet")
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            out = unet(**inputs).sample
        torch.save(out, {str(tmp_path / "stock.pt")!r})
        assert not any(name.startswith("tucker_lora") for name in sys.modules), "tucker_lora was imported"
        """)  # fmt: skip
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    stock = torch.load(tmp_path / "stock.pt")
    with torch.no_grad():
        unet.disable_adapters()
        base = unet(**inputs).sample
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output, so the comparison means something
    assert_close(stock, expected)


def test_peft_format_adapter_reloads_at_the_final_ranks(tmp_path):
    from diffusers import UNet2DConditionModel

    unet, inputs = adapted_tiny_unet(tmp_path)
    with torch.no_grad():
        expected = unet(**inputs).sample
    folder = save_adapter(unet, str(tmp_path / "out"), "tucker")
    fresh = UNet2DConditionModel.from_pretrained(tmp_path / "base").eval()
    load_adapter(fresh, folder)
    assert tucker_lora.get_ranks(fresh) == tucker_lora.get_ranks(unet)
    with torch.no_grad():
        assert_close(fresh(**inputs).sample, expected)
    assert REPO.is_dir()
