"""The kohya-format file: its keys, the maths of its tensors (LyCORIS' down / mid / up reconstruction equals the
Tucker delta; applied as three convolutions it gives the Tucker layer's output), and what stock diffusers'
`pipe.load_lora_weights` does with it in a process that never imports tucker_lora."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from dreambooth_fixtures import adapted_tiny_unet
from export_diffusers import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, save_diffusers_lora, save_kohya_lora
from safetensors.torch import load_file

import tucker_lora
from tests.tolerances import assert_close
from tucker_lora.export import kohya_lora_state_dict
from tucker_lora.layer import Conv2d, TuckerLayer


def _tucker_layers(unet) -> dict[str, TuckerLayer]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, TuckerLayer)}


def _kohya_key(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def test_kohya_keys_and_shapes(tmp_path):
    unet, _ = adapted_tiny_unet(tmp_path)
    tensors = load_file(save_kohya_lora(unet, str(tmp_path / "out"), "tucker"))
    layers = _tucker_layers(unet)
    suffixes = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha")
    assert all(k.startswith("lora_unet_") and k.endswith(suffixes) for k in tensors)
    ranks = []
    for name, layer in layers.items():
        key = _kohya_key(name)
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        assert down.shape[0] == up.shape[1]
        ranks.append(down.shape[0])
        has_mid = f"{key}.lora_mid.weight" in tensors
        assert has_mid == isinstance(layer, Conv2d)  # all the tiny UNet's targeted convs are 3x3
    # one alpha for the file (the largest rank), even though the ranks differ
    assert len(set(ranks)) > 1
    assert {tensors[f"{_kohya_key(name)}.alpha"].item() for name in layers} == {max(ranks)}
    key = _kohya_key("down_blocks.0.resnets.0.conv1")  # ranks (2, 3): padded to a square core of rank 3
    assert tensors[f"{key}.lora_down.weight"].shape == (3, 8, 1, 1)
    assert tensors[f"{key}.lora_mid.weight"].shape == (3, 3, 3, 3)
    assert tensors[f"{key}.lora_up.weight"].shape == (8, 3, 1, 1)
    assert len(tensors) == 3 * len(layers) + sum(isinstance(m, Conv2d) for m in layers.values())
    with pytest.raises(ValueError, match="`conv_format` must be one of"):
        kohya_lora_state_dict(unet, conv_format="cp")


@pytest.mark.parametrize("conv_format", ["tucker", "flat"])
def test_kohya_tensors_rebuild_the_tucker_delta(tmp_path, conv_format):
    unet, _ = adapted_tiny_unet(tmp_path)
    tensors = kohya_lora_state_dict(unet, conv_format=conv_format)
    for name, layer in _tucker_layers(unet).items():
        key = _kohya_key(name)
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        scale = tensors[f"{key}.alpha"].item() / down.shape[0]
        if f"{key}.lora_mid.weight" in tensors:  # LyCORIS: dW[o, i] = sum up[o, a] mid[a, b] down[b, i]
            mid = tensors[f"{key}.lora_mid.weight"]
            delta = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid, down.flatten(1)) * scale
        else:  # kohya LoRA / LoCon: up @ down, the kernel in lora_down
            delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.get_base_layer().weight.shape) * scale
        with torch.no_grad():
            assert_close(delta, layer.delta_weight("default"))


def test_kohya_file_of_the_lora_baseline_rebuilds_its_delta(tmp_path):
    from diffusers import UNet2DConditionModel
    from dreambooth_fixtures import ADAPTED_TARGETS, tiny_unet_config
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=16))
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=ADAPTED_TARGETS, init_lora_weights=False))
    tensors = load_file(save_kohya_lora(unet, str(tmp_path / "out"), "lora"))
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert len(tensors) == 3 * len(layers)
    for name, layer in layers.items():
        key = _kohya_key(name)
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.get_base_layer().weight.shape)
        with torch.no_grad():
            assert_close(delta * tensors[f"{key}.alpha"].item() / down.shape[0], layer.get_delta_weight("default"))


def test_kohya_tucker_conv_as_three_convolutions_gives_the_layer_output(tmp_path):
    unet, _ = adapted_tiny_unet(tmp_path)
    tensors = kohya_lora_state_dict(unet, conv_format="tucker")
    generator = torch.Generator().manual_seed(2)
    convs = {name: m for name, m in _tucker_layers(unet).items() if isinstance(m, Conv2d)}
    assert convs
    for name, layer in convs.items():
        key, base = _kohya_key(name), layer.get_base_layer()
        x = torch.randn(2, base.in_channels, 6, 6, generator=generator)
        h = F.conv2d(x, tensors[f"{key}.lora_down.weight"])  # as LyCORIS' LoCon forward: up(mid(down(x)))
        h = F.conv2d(h, tensors[f"{key}.lora_mid.weight"], stride=base.stride, padding=base.padding)
        h = F.conv2d(h, tensors[f"{key}.lora_up.weight"]) * (tensors[f"{key}.alpha"].item() / h.shape[1])
        with torch.no_grad():
            assert_close(base(x) + h, layer(x))


LOADER = """
import json, sys, torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

def pipeline():  # a real StableDiffusionPipeline around the tiny UNet (no tokenizer: nothing is encoded here)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                num_hidden_layers=1, vocab_size=100))
    unet = UNet2DConditionModel.from_pretrained(BASE).eval()
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

inputs = torch.load(INPUTS)
outputs, errors = {}, {}
for label, folder, weight_name in FILES:
    pipe = pipeline()
    try:
        pipe.load_lora_weights(folder, weight_name=weight_name)
    except ValueError as error:
        errors[label] = str(error)
        continue
    with torch.no_grad():
        outputs[label] = pipe.unet(**inputs).sample
torch.save(outputs, OUTPUTS)
json.dump(errors, open(ERRORS, "w"))
assert not any(name.startswith("tucker_lora") for name in sys.modules), "tucker_lora was imported"
"""


def test_stock_diffusers_load_lora_weights_on_the_kohya_files(tmp_path):
    unet, inputs = adapted_tiny_unet(tmp_path)
    with torch.no_grad():
        expected = unet(**inputs).sample
        unet.disable_adapters()
        base = unet(**inputs).sample
        unet.enable_adapters()
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output, so the comparison means something
    save_kohya_lora(unet, str(tmp_path / "tucker"), "tucker", conv_format="tucker")
    save_kohya_lora(unet, str(tmp_path / "flat"), "tucker", conv_format="flat")
    save_diffusers_lora(unet, str(tmp_path / "diffusers"), "tucker")
    files = [
        ("kohya flat", str(tmp_path / "flat"), KOHYA_WEIGHT_NAME),
        ("diffusers", str(tmp_path / "diffusers"), DIFFUSERS_WEIGHT_NAME),
        ("kohya tucker", str(tmp_path / "tucker"), KOHYA_WEIGHT_NAME),
    ]
    torch.save(inputs, tmp_path / "inputs.pt")
    paths = {"BASE": tmp_path / "base", "INPUTS": tmp_path / "inputs.pt", "OUTPUTS": tmp_path / "outputs.pt",
             "ERRORS": tmp_path / "errors.json"}  # fmt: skip
    header = "".join(f"{k} = {str(v)!r}\n" for k, v in paths.items()) + f"FILES = {files!r}\n"
    run = subprocess.run(
        [sys.executable, "-c", header + textwrap.dedent(LOADER)], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    errors = json.loads((tmp_path / "errors.json").read_text())

    # kohya file with flat convs: diffusers converts it and reproduces the Tucker UNet, attention and convs (at
    # unequal ranks: a file with per-module alphas would not, see kohya_lora_state_dict)
    assert_close(outputs["kohya flat"], expected)
    # the diffusers-format file through the pipeline-level loader as well
    assert_close(outputs["diffusers"], expected)
    # kohya file with lora_mid: diffusers' kohya converter has no lora_mid and refuses the file, naming those keys
    assert sorted(outputs) == ["diffusers", "kohya flat"] and sorted(errors) == ["kohya tucker"]
    message = errors["kohya tucker"]
    assert "have not been correctly renamed" in message and "lora_mid.weight" in message
    assert "lora_down" not in message and "alpha" not in message  # everything else was converted
    # ... while the attention entries of the two kohya files are the same tensors
    tucker, flat = load_file(tmp_path / "tucker" / KOHYA_WEIGHT_NAME), load_file(tmp_path / "flat" / KOHYA_WEIGHT_NAME)
    attention = [k for k in flat if "_attn" in k]
    assert attention and all(torch.equal(tucker[k], flat[k]) for k in attention)
    assert len(tucker_lora.get_ranks(unet)) == sum(k.endswith(".alpha") for k in flat)
