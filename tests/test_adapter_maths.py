"""Maths invariants of the adapter (METHOD section 9 items 4, 6, 7)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

import tucker_lora
from tests.helpers import adapted, fresh_base, reduction_size, run, tucker_layers
from tests.tolerances import assert_close, assert_close_after_reduction, reduction_tol
from tests.toy_models import CASES
from tucker_lora.tucker_ops import fold, mode_product, tucker_to_tensor, unfold

CONV_CASES = [c for c in CASES if c.name.startswith("conv")]
EXPORTABLE = [c for c in CASES if c.name not in ("conv3x3-stride2-pad2-dil2", "conv3x2-reflect")]


def test_unfold_fold_and_mode_product_follow_one_convention():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    for mode in range(3):
        assert unfold(x, mode).shape == (x.shape[mode], x.numel() // x.shape[mode])
        torch.testing.assert_close(fold(unfold(x, mode), mode, x.shape), x)
    m = torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(mode_product(x, m, 1), torch.einsum("ajc,bj->abc", x, m))


@pytest.mark.parametrize("case", CONV_CASES, ids=[c.name for c in CONV_CASES])
def test_three_convolution_forward_equals_dense_kernel_conv(case):
    model, inputs = adapted(case, init_weights=False)
    for layer in tucker_layers(model):
        base = layer.get_base_layer()
        x = torch.randn(2, base.in_channels, 9, 9, dtype=torch.float32)
        dense = layer.delta_weight("default") / layer.tucker_scaling["default"]
        if base.padding_mode != "zeros":
            padded = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            expected = F.conv2d(padded, dense, stride=base.stride, dilation=base.dilation)
        else:
            expected = F.conv2d(x, dense, stride=base.stride, padding=base.padding, dilation=base.dilation)
        assert_close(layer._adapter_output("default", x), expected)


def test_linear_delta_weight_is_scaled_tucker_product():
    model, _ = adapted(CASES[0], init_weights=False)
    layer = tucker_layers(model)[0]
    u_out, u_in = layer.active_bases("default")
    expected = layer.tucker_scaling["default"] * u_out @ layer.active_core("default") @ u_in.T
    assert_close(layer.delta_weight("default"), expected)
    assert_close(
        tucker_to_tensor(layer.active_core("default"), [u_out, u_in]), u_out @ layer.active_core("default") @ u_in.T
    )


def test_bases_start_orthonormal_and_zero_beyond_rank():
    model, _ = adapted(CASES[-2])  # DeBERTa
    for layer in tucker_layers(model):
        for basis, rank in zip(layer.tucker_bases["default"], layer.active_ranks("default")):
            assert tucker_lora.tucker_ops.orthonormality_error(basis[:, :rank]) < 1e-6
            assert torch.count_nonzero(basis[:, rank:]) == 0


@pytest.mark.parametrize("case", EXPORTABLE, ids=[c.name for c in EXPORTABLE])
def test_export_to_lora_reproduces_outputs(case, tmp_path):
    model, inputs = adapted(case, init_weights=False)
    expected = run(model, case, inputs)
    lora_config = tucker_lora.export_lora(model, tmp_path)
    assert lora_config.rank_pattern and lora_config.alpha_pattern
    lora_model = PeftModel.from_pretrained(fresh_base(case), tmp_path)
    assert type(lora_model.peft_config["default"]).__name__ == "LoraConfig"
    # the LoRA pair sums in another order than the Tucker forward: the rounding of the whole network differs
    assert_close_after_reduction(run(lora_model, case, inputs), expected, reduction_size(fresh_base(case)))


@pytest.mark.parametrize("case", EXPORTABLE, ids=[c.name for c in EXPORTABLE])
def test_export_tolerance_covers_the_float32_rounding_of_the_network(case):
    # the export test compares two float32 runs, each off the exact result by up to its rounding error `e`: the
    # tolerance must hold 2 e with a factor 2 to spare, whatever order the threads sum in (measured against float64)
    model, inputs = adapted(case, init_weights=False)
    actual = run(model, case, inputs).double()
    model64 = copy.deepcopy(model).double()
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    exact = run(model64, case, inputs64)
    tol = reduction_tol(torch.float32, reduction_size(fresh_base(case)), float(exact.abs().max()))
    used = ((actual - exact).abs() / (tol["atol"] + tol["rtol"] * exact.abs())).max()
    assert 2 * 2 * used <= 1, f"rounding uses {used:.3f} of the tolerance"


def test_export_refuses_a_conv_that_lora_cannot_express(tmp_path):
    case = next(c for c in CASES if c.name == "conv3x2-reflect")
    model, _ = adapted(case, init_weights=False)
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        tucker_lora.export_lora(model, tmp_path)


def test_exported_lora_loads_in_a_process_without_tucker_lora(tmp_path):
    case = next(c for c in CASES if c.name == "deberta-v2")
    model, inputs = adapted(case, init_weights=False)
    torch.save(run(model, case, inputs), tmp_path / "expected.pt")
    tucker_lora.export_lora(model, tmp_path / "lora")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from tests.toy_models import CASES
        case = next(c for c in CASES if c.name == "deberta-v2")
        torch.manual_seed(0)
        base = case.make_model()
        model = PeftModel.from_pretrained(base, r"{tmp_path / "lora"}").eval()
        assert "tucker_lora" not in sys.modules, "tucker_lora was imported"
        with torch.no_grad():
            out = model(**case.make_inputs()).logits
        torch.testing.assert_close(out, torch.load(r"{tmp_path / "expected.pt"}"), atol=1e-5, rtol=1e-4)
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
