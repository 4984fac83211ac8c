"""The one module that touches PEFT internals: fails loudly if a PEFT release breaks the registration."""

from __future__ import annotations

import importlib
import subprocess
import sys

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import tucker_lora
from tucker_lora._peft_internals import ensure_peft_type, register_tucker_method


def test_tucker_is_a_real_peft_type_member():
    member = PeftType.TUCKER
    assert isinstance(member, PeftType) and member.value == "TUCKER" and member.name == "TUCKER"
    assert PeftType("TUCKER") is member and member in list(PeftType)
    assert member.value.lower() + "_" == tucker_lora.TuckerModel.prefix  # how transformers builds the prefix


def test_registration_fills_peft_mappings():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TUCKER] is tucker_lora.TuckerAdapterConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TUCKER] is tucker_lora.TuckerModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TUCKER] == "tucker_"


def test_importing_and_registering_twice_is_harmless():
    importlib.reload(tucker_lora)
    assert ensure_peft_type() is PeftType.TUCKER
    register_tucker_method(tucker_lora.TuckerAdapterConfig, tucker_lora.TuckerModel)
    assert list(PeftType).count(PeftType.TUCKER) == 1


def test_loading_without_importing_tucker_lora_fails_on_the_type(tmp_path):
    """PEFT resolves the type before any of our code can run; the README says to import tucker_lora first."""
    script = f"from peft import PeftConfig\nPeftConfig.from_pretrained(r'{tmp_path}')\n"
    tucker_lora.TuckerAdapterConfig(target_modules=["x"]).save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "TUCKER" in result.stderr
    ok = subprocess.run(
        [sys.executable, "-c", "import tucker_lora\n" + script], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr[-1000:]


def test_peft_serialization_hooks_keep_the_signature_we_override():
    """`CompactSerialization` overrides these internal classmethods; a renamed or reshaped hook must fail here."""
    import inspect

    from peft.tuners.tuners_utils import BaseTuner

    get_params = list(inspect.signature(BaseTuner._get_adapter_state_dict).parameters)
    remap_params = list(inspect.signature(BaseTuner._remap_adapter_state_dict_for_load).parameters)
    assert get_params == ["model", "config", "adapter_name", "state_dict", "unwanted_adapter_names"]
    assert remap_params == ["model", "config", "adapter_name", "state_dict"]
    assert tucker_lora.TuckerModel._get_adapter_state_dict.__func__.__qualname__.startswith("CompactSerialization")
