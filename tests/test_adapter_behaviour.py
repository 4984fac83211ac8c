"""Shared PEFT behaviours, run for every (toy model, config) case in `toy_models.CASES`."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import tucker_lora
from tests.helpers import adapted, fresh_base, reduction_size, run, set_ranks_by_hand, tucker_layers
from tests.tolerances import assert_close, assert_close_after_reduction
from tests.toy_models import CASES

CASE_IDS = [case.name for case in CASES]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    return request.param


def test_zero_core_at_init_gives_base_output(case):
    base_output = run(fresh_base(case), case, case.make_inputs())
    model, inputs = adapted(case)
    assert_close(run(model, case, inputs), base_output)
    for layer in tucker_layers(model):
        assert torch.count_nonzero(layer.delta_weight("default")) == 0


def test_disable_adapter_gives_base_output_exactly(case):
    base_output = run(fresh_base(case), case, case.make_inputs())
    model, inputs = adapted(case, init_weights=False)
    assert not torch.allclose(run(model, case, inputs), base_output), "a random core must change the output"
    with model.disable_adapter():
        torch.testing.assert_close(run(model, case, inputs), base_output, rtol=0, atol=0)


def test_merge_unmerge_and_merge_and_unload_match_unmerged(case):
    model, inputs = adapted(case, init_weights=False)
    unmerged = run(model, case, inputs)
    # a merged weight sums in another order than the adapter forward: the rounding of the whole network differs
    size = reduction_size(fresh_base(case))
    model.merge_adapter()
    assert_close_after_reduction(run(model, case, inputs), unmerged, size)
    model.unmerge_adapter()
    assert_close_after_reduction(run(model, case, inputs), unmerged, size)
    merged_model = model.merge_and_unload()
    assert not tucker_layers(merged_model)
    assert_close_after_reduction(run(merged_model, case, inputs), unmerged, size)


def test_save_and_load_restore_outputs_after_ranks_changed_by_hand(case, tmp_path):
    model, inputs = adapted(case, init_weights=False)
    layers = tucker_layers(model)
    for i, layer in enumerate(layers):
        new_ranks = [
            max(1, min(c, r + (1 if i % 2 else -1)))
            for r, c in zip(layer.active_ranks("default"), layer.capacities("default"))
        ]
        set_ranks_by_hand(layer, "default", new_ranks, seed=i)
    expected = run(model, case, inputs)
    expected_ranks = tucker_lora.get_ranks(model)
    model.save_pretrained(tmp_path)

    base = fresh_base(case)
    torch.manual_seed(123)  # the adapter drawn at load must not matter: the file overrides it
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert tucker_lora.get_ranks(loaded) == expected_ranks
    assert_close(run(loaded, case, inputs), expected)
    assert loaded.peft_config["default"].rank_pattern == expected_ranks


def test_saved_file_holds_only_active_slices(case, tmp_path):
    from safetensors.torch import load_file

    model, _ = adapted(case)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    ranks = tucker_lora.get_ranks(model)
    for name, layer_ranks in ranks.items():
        core = saved[f"base_model.model.{name}.tucker_core"]
        assert list(core.shape[: len(layer_ranks)]) == layer_ranks
        for mode, rank in enumerate(layer_ranks):
            assert saved[f"base_model.model.{name}.tucker_bases.{mode}"].shape[1] == rank


def test_multiple_adapters_add_set_delete(case):
    model, inputs = adapted(case, init_weights=False)
    first = run(model, case, inputs)
    model.add_adapter("second", tucker_lora.TuckerAdapterConfig(**{**case.config, "init_weights": False}))
    model.set_adapter("second")
    second = run(model, case, inputs)
    assert not torch.allclose(first, second)
    for layer in tucker_layers(model):
        assert layer.tucker_core["second"].requires_grad and not layer.tucker_core["default"].requires_grad
    model.set_adapter("default")
    assert_close(run(model, case, inputs), first)
    model.delete_adapter("second")
    assert all("second" not in layer.tucker_core for layer in tucker_layers(model))
    assert_close(run(model, case, inputs), first)


def test_scale_layer_and_set_scale_scale_the_update(case):
    model, inputs = adapted(case, init_weights=False)
    with model.disable_adapter():
        base_output = run(model, case, inputs)
    full = run(model, case, inputs)
    layers = tucker_layers(model)
    for layer in layers:
        layer.set_scale("default", 0.0)
    assert_close(run(model, case, inputs), base_output)
    for layer in layers:
        layer.unscale_layer()
    assert_close(run(model, case, inputs), full)
    for layer in layers:
        layer.scale_layer(0.0)
    assert_close(run(model, case, inputs), base_output)
    for layer in layers:
        layer.unscale_layer()


def test_only_adapter_and_head_are_trainable_and_get_gradients(case):
    model, inputs = adapted(case, init_weights=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".tucker_" in n or "modules_to_save" in n for n in trainable), sorted(trainable)[:5]
    case.output_of(model(**inputs)).float().pow(2).mean().backward()
    for layer in tucker_layers(model):
        assert layer.tucker_core["default"].grad is not None
        assert all(b.grad is not None for b in layer.tucker_bases["default"])


def test_count_parameters_counts_active_slices_and_head(case):
    model, _ = adapted(case)
    expected = 0
    for layer in tucker_layers(model):
        ranks = layer.active_ranks("default")
        core = layer.tucker_core["default"]
        unfactored = core.shape[len(ranks) :].numel()
        expected += torch.Size(ranks).numel() * unfactored
        expected += sum(b.shape[0] * r for b, r in zip(layer.tucker_bases["default"], ranks))
    expected += sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
    assert tucker_lora.count_parameters(model) == expected
    allocated = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert tucker_lora.count_parameters(model) < allocated


def test_default_targets_for_deberta_are_the_papers_six_matrices_per_layer():
    from tests.toy_models import tiny_deberta

    model = tucker_lora_model(tiny_deberta(), task_type="SEQ_CLS")
    names = sorted(tucker_lora.get_ranks(model))
    assert len(names) == 6 * 2
    suffixes = {n.split("layer.0.")[1] for n in names if "layer.0." in n}
    assert suffixes == {
        "attention.self.query_proj",
        "attention.self.key_proj",
        "attention.self.value_proj",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }
    assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad), "head not trained"


def test_layers_to_transform_limits_adaptation_to_those_layers():
    from tests.toy_models import tiny_deberta

    model = tucker_lora_model(tiny_deberta(), task_type="SEQ_CLS", layers_to_transform=[1], layers_pattern="layer")
    names = tucker_lora.get_ranks(model)
    assert names and all(".layer.1." in n for n in names)


def test_bfloat16_base_model_with_float32_adapter():
    from tests.toy_models import MLP

    torch.manual_seed(0)
    model = tucker_lora_model(MLP().to(torch.bfloat16), target_modules=["lin0", "lin1"], init_weights=False)
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    layer = tucker_layers(model)[0]
    assert layer.tucker_core["default"].dtype == torch.float32
    with torch.no_grad():
        unmerged = model(x)
        assert unmerged.dtype == torch.bfloat16
        model.merge_adapter()
        merged = model(x)
    assert_close(merged, unmerged, dtype=torch.bfloat16)


def tucker_lora_model(base, **config):
    from peft import get_peft_model

    return get_peft_model(base, tucker_lora.TuckerAdapterConfig(**config))


def test_saving_does_not_change_the_callers_config(tmp_path):
    from tests.toy_models import MLP

    config = tucker_lora.TuckerAdapterConfig(r=3, target_modules=["lin0", "lin1"])
    model = tucker_lora_model_from(MLP(), config)
    set_ranks_by_hand(tucker_layers(model)[0], "default", [1, 1])
    model.save_pretrained(tmp_path)
    assert config.rank_pattern == {}
    assert model.peft_config["default"].rank_pattern == {"lin0": [1, 1], "lin1": [3, 3]}
    assert tucker_lora.get_ranks(tucker_lora_model_from(MLP(), config)) == {"lin0": [3, 3], "lin1": [3, 3]}


def tucker_lora_model_from(base, config):
    from peft import get_peft_model

    return get_peft_model(base, config)
