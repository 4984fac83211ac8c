"""Forward + backward time of Tucker adapters against PEFT LoRA r=8, on a DeBERTaV3-base-shaped model.

Every variant below adapts the same 72 matrices (`query_proj, key_proj, value_proj, intermediate.dense,
output.dense` in 12 layers) of the same randomly initialized model (no hub access). One timed repetition is one
`model(**batch).loss.backward()` with gradients cleared before it (not timed). The variants are interleaved
(A, B, C, A, B, C, ...) after a warm-up, and each figure is the median over the repetitions, divided by the LoRA
median of the same run.

    python benchmarks/forward_backward.py --output outputs/forward_backward.json
    python benchmarks/forward_backward.py --quick          # 2 layers, smoke test (~1 minute)
    python benchmarks/forward_backward.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

TARGET_RATIO = 1.10


def _sliced_adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
    """The former forward of `tucker_lora.layer.Linear`, on the active slices (4 slices per layer and their
    `SliceBackward`): the reference the package's capacity forward is timed against."""
    u_out, u_in = self.active_bases(adapter_name)
    return ((x @ u_in) @ self.active_core(adapter_name).T) @ u_out.T


def install_sliced_forward(model) -> int:
    """Puts the sliced forward on every Tucker `Linear` of `model` (instance attribute); returns how many."""
    from tucker_lora.layer import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for layer in layers:
        layer._adapter_output = types.MethodType(_sliced_adapter_output, layer)
    return len(layers)


def variants(include_wide: bool, include_sliced: bool) -> dict[str, tuple[object, bool]]:
    """name -> (adapter config, whether the Tucker layers use the sliced reference forward)."""
    out = {
        "lora_r8": (common.lora_config(8), False),
        # zero core at init (dW = 0), ranks 8 active: the state at step 0
        "tucker_r8_zero_core": (common.tucker_config(8), False),
        # random core, ranks 8 active: a non-trivial adapter (same arithmetic as zero core, checks nothing is skipped)
        "tucker_r8_random_core": (common.tucker_config(8, init_weights=False), False),
    }
    if include_wide:
        # the widest the adapter gets mid-cycle with r=8: augmented width 16 per mode (random core)
        wide = common.tucker_config(8, init_weights=False, rank_pattern={".*": 16})
        out["tucker_width16_random_core"] = (wide, False)
        out["lora_r16"] = (common.lora_config(16), False)
    if include_sliced:
        out["tucker_r8_random_core_sliced_forward"] = (common.tucker_config(8, init_weights=False), True)
    return out


def adapter_summary(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranks = sorted({tuple(r) for r in _tucker_ranks(model)})
    return {"trainable_parameters": trainable, "tucker_active_ranks": [list(r) for r in ranks] or None}


def _tucker_ranks(model):
    from tucker_lora import TuckerLayer

    for module in model.modules():
        if isinstance(module, TuckerLayer):
            for name in module.tucker_core:
                yield module.active_ranks(name)


def run(args: argparse.Namespace) -> dict:
    device = common.resolve_device(args.device)
    batch = common.synthetic_batch(args.batch_size, args.seq_len, device)
    models = {}
    for name, (config, sliced) in variants(args.wide, args.sliced).items():
        models[name] = common.peft_model(config, args.layers, device)
        if sliced:
            install_sliced_forward(models[name])
    n_adapted = {name: _count_adapted(model) for name, model in models.items()}

    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.warmup + args.repeats):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            elapsed, cpu = common.timed(lambda: model(**batch).loss.backward(), device)
            if rep >= args.warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
        print(
            f"repetition {rep + 1}/{args.warmup + args.repeats}" + (" (warm-up)" if rep < args.warmup else ""),
            file=sys.stderr,
            flush=True,
        )

    lora_median = common.median(times["lora_r8"])
    results = {}
    for name, values in times.items():
        med = common.median(values)
        results[name] = {
            "median_s": med,
            "min_s": min(values),
            "max_s": max(values),
            "times_s": values,
            "ratio_to_lora_r8": med / lora_median,
            # per-repetition ratios: each repetition's variants ran back to back, so this is less noise-prone
            "median_paired_ratio_to_lora_r8": common.median([v / lo for v, lo in zip(values, times["lora_r8"])]),
            "process_cpu_times_s": cpu_times[name],
            "median_process_cpu_s": common.median(cpu_times[name]),
            "process_cpu_ratio_to_lora_r8": common.median(cpu_times[name]) / common.median(cpu_times["lora_r8"]),
            "adapted_modules": n_adapted[name],
            **adapter_summary(models[name]),
        }
    return {
        "benchmark": "forward_backward",
        "environment": common.environment(device),
        "settings": {
            **common.model_settings(args),
            "repeats": args.repeats,
            "timed": "model(**batch).loss.backward() (grads cleared before, untimed); train mode (dropout on)",
            "target": f"tucker_r8 median <= {TARGET_RATIO} x lora_r8 median",
        },
        "results": results,
    }


def _count_adapted(model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def table(report: dict) -> str:
    rows = []
    for name, r in report["results"].items():
        rows.append(
            [
                name,
                r["adapted_modules"],
                f"{r['trainable_parameters']:,}",
                f"{r['median_s'] * 1e3:.1f}",
                f"{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}",
                f"{r['ratio_to_lora_r8']:.3f}",
                f"{r['median_paired_ratio_to_lora_r8']:.3f}",
                f"{r['median_process_cpu_s'] * 1e3:.1f}" if "median_process_cpu_s" in r else "-",
                f"{r['process_cpu_ratio_to_lora_r8']:.3f}" if "process_cpu_ratio_to_lora_r8" in r else "-",
            ]
        )
    header = [
        "variant",
        "adapted",
        "trainable params",
        "median fwd+bwd (ms)",
        "range (ms)",
        "ratio to LoRA r8",
        "median paired ratio",
        "median process CPU time (ms)",
        "CPU-time ratio to LoRA r8",
    ]
    s = report["settings"]
    env = report["environment"]
    title = (
        f"forward+backward, {s['model']}, batch {s['batch_size']} x seq {s['seq_len']}, device {env['device']}, "
        f"{env['torch_num_threads']} threads, {s['repeats']} interleaved repetitions after {s['warmup']} warm-up"
    )
    return title + "\n\n" + common.markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(parser, warmup=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wide", action="store_true", help="also time Tucker at augmented width 16 and LoRA r=16")
    parser.add_argument(
        "--sliced", action="store_true", help="also time Tucker with the former forward on the active slices"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 layers, batch 2 x seq 64, 3 repeats")
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("`--repeats` must be >= 1 and `--warmup` >= 0")
    if args.quick:
        args.layers, args.batch_size, args.seq_len, args.repeats = 2, 2, 64, 3
    common.set_model(args.model)
    report = run(args)
    report["settings"]["command"] = " ".join(sys.argv)
    text = table(report)
    common.write_report(report, text, args.output)


if __name__ == "__main__":
    main()
