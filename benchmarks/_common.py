"""Shared pieces of the benchmark runners: the DeBERTaV3-base-shaped model, the methods, the environment record.

Every figure the runners report is a ratio to PEFT LoRA r=8 measured in the same process, with the methods
interleaved (A, B, C, A, B, C, ...) so that machine noise hits all of them alike.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, DebertaV2Config, DebertaV2ForSequenceClassification

import tucker_lora
from tucker_lora import TuckerAdapterConfig

# the paper's targets on DeBERTaV3-base: 12 layers x 6 matrices ("output.dense" matches two per layer) = 72
TARGETS = ["query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense"]
# the same six matrices per layer in BERT (3 shape groups: 768x768, 3072x768, 768x3072)
BERT_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]
MODELS = ("deberta", "bert")
_model_kind = "deberta"


def set_model(kind: str) -> None:
    """Which architecture `base_model` builds (`deberta` or `bert`) and which matrices the adapters target."""
    global _model_kind
    if kind not in MODELS:
        raise ValueError(f"`--model` must be one of {MODELS}; got {kind!r}")
    _model_kind = kind


def targets() -> list[str]:
    return BERT_TARGETS if _model_kind == "bert" else TARGETS


def bert_base_config(num_layers: int = 12) -> BertConfig:
    """The architecture of bert-base-uncased (random weights)."""
    return BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=num_layers,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        num_labels=2,
    )


REPO_ROOT = Path(__file__).resolve().parent.parent


def deberta_v3_base_config(num_layers: int = 12) -> DebertaV2Config:
    """The architecture of microsoft/deberta-v3-base (random weights: no hub access needed)."""
    return DebertaV2Config(
        vocab_size=128100,
        hidden_size=768,
        num_hidden_layers=num_layers,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=0,
        relative_attention=True,
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        layer_norm_eps=1e-7,
        pad_token_id=0,
        num_labels=2,
    )


def base_model(num_layers: int, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A fresh model with the same random weights for every call with the same seed (dropout as in training)."""
    torch.manual_seed(seed)
    if _model_kind == "bert":
        model = BertForSequenceClassification(bert_base_config(num_layers))
    else:
        model = DebertaV2ForSequenceClassification(deberta_v3_base_config(num_layers))
    return model.to(device).train()


def synthetic_batch(batch_size: int, seq_len: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    vocab = 30522 if _model_kind == "bert" else 128100
    input_ids = torch.randint(1, vocab, (batch_size, seq_len), generator=generator)
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long).to(device),
        "labels": labels.to(device),
    }


def lora_config(r: int = 8) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=r, target_modules=targets(), task_type="SEQ_CLS")


def adalora_config(total_step: int) -> AdaLoraConfig:
    # METHOD.md section 8's baseline: target_r 8, init_r 10; tinit = tfinal = 0 so that the budget schedule (importance
    # EMA every step, masking every deltaT steps) runs during every measured step
    return AdaLoraConfig(
        init_r=10,
        target_r=8,
        lora_alpha=8,
        target_modules=targets(),
        task_type="SEQ_CLS",
        total_step=total_step,
        tinit=0,
        tfinal=0,
        deltaT=10,
    )


def tucker_config(r: int = 8, **kwargs) -> TuckerAdapterConfig:
    return TuckerAdapterConfig(r=r, alpha=r, target_modules=targets(), task_type="SEQ_CLS", **kwargs)


def peft_model(config, num_layers: int, device: torch.device):
    return get_peft_model(base_model(num_layers, device), config)


def frozen_model(num_layers: int, device: torch.device):
    """The floor: no adapter, every weight frozen except the classifier head (as PEFT's SEQ_CLS trains it), and
    `requires_grad` on the input embeddings so that backward runs through the whole network."""
    model = base_model(num_layers, device)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    model.enable_input_require_grads()
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of `fn()`, the device synchronized around it.

    The process CPU time counts the work of this process only: on a CPU shared with other jobs it is much less noisy
    than the wall clock (with one thread it is the work done; with several, OpenMP's spin-waiting adds to it)."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
        return "uncommitted"


def environment(device: torch.device) -> dict:
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "tucker_lora": tucker_lora.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "torch_num_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "cpu_load_avg_1_5_15": list(os.getloadavg()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`--device {name}` was asked for, but torch.cuda.is_available() is False.")
    return device


def write_report(report: dict, text: str, output: Path | None) -> None:
    """Print the table; with `output`, write the JSON report there and the same table beside it as `.md`."""
    print(text)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        output.with_suffix(".md").write_text(text + "\n")
        print(f"\nwrote {output} and {output.with_suffix('.md')}")


def add_model_arguments(parser, warmup: int) -> None:
    """The arguments every benchmark takes: device and the model/batch shape."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=MODELS, default="deberta", help="architecture (random weights)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=warmup)


def model_settings(args) -> dict:
    """The report entries that describe what `add_model_arguments` configured."""
    name = "BERT-base" if args.model == "bert" else "DeBERTaV3-base"
    return {
        "model": f"{name} architecture, random weights, {args.layers} layers",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup": args.warmup,
    }
