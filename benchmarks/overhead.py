"""Training-step overhead of Tucker adapters: step time, peak memory and operator calls against PEFT LoRA r=8.

Methods, all on a DeBERTaV3-base-shaped model (`--model bert`: BERT-base-shaped; random weights), the 72 matrices of
METHOD.md section 8 (query, key, value, attention output, intermediate, output per layer), AdamW
(lr 5e-4, weight decay 0.01) over the trainable parameters:

* `frozen`: no adapter; only the classifier trains, and the input embeddings require grad so that backward runs
  through the whole network. The floor any adapter method pays.
* `lora_r8`: PEFT LoRA r=8, alpha 8.
* `adalora`: PEFT AdaLoRA init_r 10, target_r 8, `update_and_allocate(step)` after every optimizer step
  (tinit = tfinal = 0, deltaT = 10, so the importance scores are updated every measured step).
* `tucker_fixed_r8`: Tucker r=8 with FIXED ranks, no rank update: the basis gradients are dropped before
  `optimizer.step()` so only the core trains. Not the method; it isolates the adapter's own step cost.
* `tucker_c1`, `tucker_c10`: the method: Tucker r=8 with `TuckerRankUpdater(model, optimizer)` and `core_steps` 1 and
  10, `augment_start_step=0`, random initial core (so that the first augmentation already has non-zero basis
  gradients and does real work). Only run when `tucker_lora.rank_updater.TuckerRankUpdater` exists.

A step is: forward, backward, [updater.before_step()], optimizer.step(), [AdaLoRA update_and_allocate /
updater.after_step()], optimizer.zero_grad(). Methods are interleaved step by step (A, B, C, A, B, C, ...) after a
warm-up. Step time: median over the measured steps, and mean over the measured window (the amortized cost when the
window holds whole rank-update cycles). The time spent inside the rank-update calls is recorded separately per step.

Peak memory is measured in a fresh subprocess per method (so that methods cannot share allocator caches):
* CUDA: `torch.cuda.max_memory_allocated()` minus the memory allocated once the model and optimizer are built;
* CPU: the increase of the process's peak resident set size (VmHWM in /proc/self/status, reset through
  /proc/self/clear_refs) over the resident size once the model and optimizer are built. It counts gradients,
  optimizer state, activations and whatever the allocator keeps resident, over `--memory-steps` steps.

Operator calls per step (`benchmarks/op_counts.py`, torch.profiler; CUDA kernels when on a GPU) are counted for every
method over `--count-steps` further steps (whole cycles: the amortized count), and the cycle's operator calls are
measured against the number of adapted same-shape layers (`--cycle-layers`, Linear(768, 768) stacks). The targets of
the launch-efficiency work are checked in the report: operator calls per step of the default cycle (`tucker_c10`)
<= 1.5x LoRA's, the cycle's calls per step at 12 layers <= 1.5x those at 4, step time <= 1.10x LoRA (CPU or GPU, as
run; GPU figures are pending in a CPU run), one full cycle cheaper than one LoRA step.

    python benchmarks/overhead.py --model bert --layers 12 --batch-size 4 --seq-len 64 --output ...   # BERT shape
    python benchmarks/overhead.py --output benchmarks/results/overhead_cpu.json
    python benchmarks/overhead.py --quick                 # 2 layers, small batch: smoke test
    python benchmarks/overhead.py --device cuda --warmup 4 --steps 44   # 4 whole cycles of core_steps=10
    python benchmarks/overhead.py --profile               # torch.profiler: top ops of a Tucker step vs a LoRA step

A rank-update cycle is `core_steps + 1` optimizer steps; choose `--steps` as a multiple of it (44 = 4 cycles of
core_steps=10 = 22 cycles of core_steps=1) so that the mean is the amortized cost.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import op_counts  # noqa: E402

LR, WEIGHT_DECAY = 5e-4, 0.01
TARGETS = {"tucker_c10": 1.10, "tucker_c1": 1.25}
MEMORY_TARGET = 1.10
DEFAULT_CYCLE = "tucker_c10"  # core_steps=10 and train_bases=True: the defaults of TuckerAdapterConfig
OPS_TARGET = 1.5  # operator calls per step (cycle included) of the default cycle / LoRA's
CYCLE_SCALING_TARGET = 1.5  # the cycle's operator calls per step at 12 layers / at 4 layers


def find_updater():
    """`TuckerRankUpdater` if the package has it, else None (the method's rows are then skipped, never faked)."""
    try:
        return importlib.import_module("tucker_lora.rank_updater").TuckerRankUpdater
    except (ImportError, AttributeError):
        return None


def method_names(updater_available: bool) -> list[str]:
    names = ["frozen", "lora_r8", "adalora", "tucker_fixed_r8"]
    if updater_available:
        names += ["tucker_c1", "tucker_c10"]
    return names


class Method:
    """One model + optimizer (+ rank updater) and its training step."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device) -> None:
        self.name, self.device = name, device
        self.updater = None
        self.adalora = False
        self.tucker_layers = []
        layers = args.layers
        if name == "frozen":
            self.model = common.frozen_model(layers, device)
        elif name == "lora_r8":
            self.model = common.peft_model(common.lora_config(8), layers, device)
        elif name == "adalora":
            self.model = common.peft_model(common.adalora_config(total_step=args.adalora_total_step), layers, device)
            self.adalora = True
        elif name == "tucker_fixed_r8":
            self.model = common.peft_model(common.tucker_config(8, init_weights=False), layers, device)
        elif name in ("tucker_c1", "tucker_c10"):
            core_steps = 1 if name == "tucker_c1" else 10
            config = common.tucker_config(8, init_weights=False, core_steps=core_steps, augment_start_step=0)
            self.model = common.peft_model(config, layers, device)
        else:
            raise ValueError(f"unknown method {name!r}")
        from tucker_lora import TuckerLayer

        self.tucker_layers = [m for m in self.model.modules() if isinstance(m, TuckerLayer)]
        self.bases = [b for layer in self.tucker_layers for bl in layer.tucker_bases.values() for b in bl]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
        if name in ("tucker_c1", "tucker_c10"):
            self.updater = find_updater()(self.model, self.optimizer)
        self.trainable = sum(p.numel() for p in params)
        self.step_index = 0
        self.records: list[dict] = []

    def rank_sum(self) -> int:
        return sum(sum(layer.active_ranks(a)) for layer in self.tucker_layers for a in layer.tucker_core)

    def step(self, batch: dict) -> dict:
        sync, now = common.synchronize, time.perf_counter
        record = {}
        sync(self.device)
        start, cpu_start = now(), time.process_time()
        loss = self.model(**batch).loss
        loss.backward()
        rank_update = 0.0
        if self.updater is not None:
            sync(self.device)
            t = now()
            self.updater.before_step()
            sync(self.device)
            rank_update += now() - t
            record["ranks_after_before_step"] = self.rank_sum()
        elif self.bases:  # tucker_fixed_r8: the bases are never stepped
            for basis in self.bases:
                basis.grad = None
        self.optimizer.step()
        if self.adalora or self.updater is not None:
            sync(self.device)
            t = now()
            if self.adalora:
                self.model.base_model.update_and_allocate(self.step_index)
            else:
                self.updater.after_step()
            sync(self.device)
            rank_update += now() - t
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        record["step_s"] = now() - start
        record["step_process_cpu_s"] = time.process_time() - cpu_start
        record["rank_update_s"] = rank_update
        if self.tucker_layers:
            record["ranks_after"] = self.rank_sum()
        self.step_index += 1
        self.records.append(record)
        return record


# ---- timing (one process, interleaved) --------------------------------------------------------------------------


def time_methods(args: argparse.Namespace, device: torch.device, names: list[str]) -> dict:
    batch = common.synthetic_batch(args.batch_size, args.seq_len, device)
    methods = {name: Method(name, args, device) for name in names}
    records: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(args.warmup + args.steps):
        for name, method in methods.items():
            rec = method.step(batch)
            rec["warmup"] = i < args.warmup
            records[name].append(rec)
        print(
            f"step {i + 1}/{args.warmup + args.steps}" + (" (warm-up)" if i < args.warmup else ""),
            file=sys.stderr,
            flush=True,
        )
    counts = {name: [] for name in names}
    for i in range(args.count_steps):
        for name, method in methods.items():
            counts[name].append(op_counts.count(lambda method=method: method.step(batch), device))
        print(f"counted step {i + 1}/{args.count_steps}", file=sys.stderr, flush=True)
    out = {}
    for name, recs in records.items():
        measured = [r for r in recs if not r["warmup"]]
        steps = [r["step_s"] for r in measured]
        updates = [r["rank_update_s"] for r in measured]
        entry = {
            "trainable_parameters": methods[name].trainable,
            "median_step_s": common.median(steps),
            "median_step_process_cpu_s": common.median([r["step_process_cpu_s"] for r in measured]),
            "mean_step_process_cpu_s": sum(r["step_process_cpu_s"] for r in measured) / len(measured),
            "mean_step_s": sum(steps) / len(steps),
            "median_rank_update_s": common.median(updates),
            "mean_rank_update_s": sum(updates) / len(updates),
            "max_rank_update_s": max(updates),
            "steps": recs,
            "op_counts_per_step": counts[name],
            "mean_op_counts": _mean_counts(counts[name]),
        }
        if methods[name].updater is not None:
            entry.update(cycle_summary(recs))
        out[name] = entry
    lora = out["lora_r8"]
    for entry in out.values():
        entry["median_ratio_to_lora"] = entry["median_step_s"] / lora["median_step_s"]
        entry["mean_ratio_to_lora"] = entry["mean_step_s"] / lora["mean_step_s"]
        paired = [r["step_s"] / lo["step_s"] for r, lo in zip(entry["steps"], lora["steps"]) if not r["warmup"]]
        entry["median_paired_ratio_to_lora"] = common.median(paired)
        entry["median_process_cpu_ratio_to_lora"] = (
            entry["median_step_process_cpu_s"] / lora["median_step_process_cpu_s"]
        )
        entry["mean_process_cpu_ratio_to_lora"] = entry["mean_step_process_cpu_s"] / lora["mean_step_process_cpu_s"]
        if entry["mean_op_counts"]:
            entry["operator_calls_ratio_to_lora"] = (
                entry["mean_op_counts"]["operator_calls"] / lora["mean_op_counts"]["operator_calls"]
            )
    return out


def _mean_counts(counts: list[dict]) -> dict | None:
    """Mean of each count over the counted steps (whole cycles: the amortized count, cycle events included)."""
    if not counts:
        return None
    return {key: sum(c[key] or 0 for c in counts) / len(counts) for key in counts[0]}


def cycle_summary(records: list[dict]) -> dict:
    """Rank-update events of the measured window, read from the total active rank before and after each call.

    An augmentation raises the total rank (in `before_step` or `after_step`, whichever the updater uses); one full
    cycle's rank-update time is the updater time of the window divided by the number of augmentations in it.
    """
    measured = [r for r in records if not r["warmup"]]
    previous = [r for r in records if r["warmup"]]
    prev_rank = previous[-1]["ranks_after"] if previous else None
    augments = truncations = 0
    for r in measured:
        mid, end = r["ranks_after_before_step"], r["ranks_after"]
        for before, after in ((prev_rank, mid), (mid, end)):
            if before is not None and after > before:
                augments += 1
            elif before is not None and after < before:
                truncations += 1
        prev_rank = end
    total_update = sum(r["rank_update_s"] for r in measured)
    return {
        "augmentations_in_window": augments,
        "truncations_in_window": truncations,
        "rank_update_total_s": total_update,
        "full_cycle_rank_update_s": total_update / augments if augments else None,
    }


# ---- memory (one fresh subprocess per method) -------------------------------------------------------------------


def _proc_status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def memory_child(args: argparse.Namespace) -> None:
    device = common.resolve_device(args.device)
    batch = common.synthetic_batch(args.batch_size, args.seq_len, device)
    method = Method(args.memory_child, args, device)
    common.synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        baseline = _proc_status_kib("VmRSS") * 1024
    for _ in range(args.memory_steps):
        method.step(batch)
    common.synchronize(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        measure = "torch.cuda.max_memory_allocated"
    else:
        peak = _proc_status_kib("VmHWM") * 1024
        measure = "VmHWM (peak RSS)"
    print("MEMORY_JSON " + json.dumps({"baseline_bytes": baseline, "peak_bytes": peak, "measure": measure}))


def measure_memory(args: argparse.Namespace, names: list[str]) -> dict:
    out = {}
    for name in names:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-child",
            name,
            "--device",
            args.device,
            "--layers",
            str(args.layers),
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--memory-steps",
            str(args.memory_steps),
            "--adalora-total-step",
            str(args.adalora_total_step),
            "--model",
            args.model,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((s for s in proc.stdout.splitlines() if s.startswith("MEMORY_JSON ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory subprocess for {name} failed:\n{proc.stderr[-3000:]}")
        data = json.loads(line.removeprefix("MEMORY_JSON "))
        data["increase_bytes"] = data["peak_bytes"] - data["baseline_bytes"]
        out[name] = data
        print(f"memory {name}: +{data['increase_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    lora = out["lora_r8"]
    for data in out.values():
        data["increase_ratio_to_lora"] = data["increase_bytes"] / lora["increase_bytes"]
        data["peak_ratio_to_lora"] = data["peak_bytes"] / lora["peak_bytes"]
    return out


# ---- profile --------------------------------------------------------------------------------------------------


def profile(args: argparse.Namespace, device: torch.device, names: list[str]) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch = common.synthetic_batch(args.batch_size, args.seq_len, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_keys = ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else [])
    tables = {}
    for name in names:
        method = Method(name, args, device)
        for _ in range(args.warmup):
            method.step(batch)
        with torch_profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                method.step(batch)
        records = list(method.records[-args.profile_steps :])
        wall = sum(r["step_s"] for r in records)
        update = sum(r["rank_update_s"] for r in records)
        for sort_by in sort_keys:
            table = prof.key_averages().table(sort_by=sort_by, row_limit=args.profile_rows)
            print(
                f"\n### {name}: {args.profile_steps} step(s) (wall {wall * 1e3:.0f} ms under the profiler, of which "
                f"rank update {update * 1e3:.0f} ms), top {args.profile_rows} ops by {sort_by}\n\n{table}",
                flush=True,
            )
            tables[f"{name}/{sort_by}"] = table
        del method
    return tables


# ---- report ---------------------------------------------------------------------------------------------------


def tables(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    timing, memory = report["timing"], report.get("memory") or {}
    rows = []
    for name, t in timing.items():
        m = memory.get(name)
        cycle = t.get("full_cycle_rank_update_s")
        rows.append(
            [
                name,
                f"{t['trainable_parameters']:,}",
                f"{t['median_step_s'] * 1e3:.0f}",
                f"{t['median_ratio_to_lora']:.3f}",
                f"{t['median_paired_ratio_to_lora']:.3f}",
                f"{t['mean_ratio_to_lora']:.3f}",
                f"{t['mean_process_cpu_ratio_to_lora']:.3f}" if "mean_process_cpu_ratio_to_lora" in t else "-",
                f"{t['mean_rank_update_s'] * 1e3:.1f}",
                f"{cycle * 1e3:.0f} ({cycle / timing['lora_r8']['median_step_s']:.3f})" if cycle else "-",
                f"{m['increase_bytes'] / 2**20:.0f}" if m else "-",
                f"{m['increase_ratio_to_lora']:.3f}" if m else "-",
                f"{m['peak_bytes'] / 2**20:.0f}" if m else "-",
            ]
        )
    header = [
        "method",
        "trainable params",
        "median step (ms)",
        "median / LoRA",
        "median paired ratio",
        "mean / LoRA",
        "mean process CPU time / LoRA",
        "mean rank update (ms/step)",
        "full cycle (ms) (/ LoRA step)",
        "peak mem increase (MiB)",
        "mem increase / LoRA",
        "peak mem (MiB)",
    ]
    title = (
        f"training step, {s['model']}, batch {s['batch_size']} x seq {s['seq_len']}, device {env['device']}, "
        f"{env['torch_num_threads']} threads; {s['steps']} interleaved steps after {s['warmup']} warm-up; "
        f"memory: {s['memory_measure']}"
    )
    text = title + "\n\n" + common.markdown_table(header, rows)
    text += "\n\n" + count_tables(report)
    text += "\n\n" + "\n".join(f"* {line}" for line in verdicts(report))
    if report.get("notes"):
        text += "\n\n" + "\n".join(f"* {n}" for n in report["notes"])
    return text


def count_tables(report: dict) -> str:
    """Operator calls per step per method (mean over the counted steps), and the cycle's calls against layer count."""
    timing = report["timing"]
    keys = ["operator_calls", "leaf_operators", "host_reads", "to_copies", "cuda_kernels"]
    rows = []
    for name, t in timing.items():
        mean = t.get("mean_op_counts")
        if mean:
            ratio = t["operator_calls_ratio_to_lora"]
            rows.append([name] + [f"{mean[k]:.1f}" for k in keys] + [f"{ratio:.3f}"])
    s = report["settings"]
    text = (
        f"operator calls per step (torch.profiler, mean over {s['count_steps']} steps counted after the timed ones; "
        "see benchmarks/op_counts.py)\n\n" + common.markdown_table(["method", *keys, "operator calls / LoRA"], rows)
    )
    cycle = report.get("cycle_vs_layers")
    if cycle:
        rows = []
        for n, c in cycle["results"].items():
            per_step = c["per_step"]
            rows.append([n] + [f"{per_step[k]:.1f}" for k in keys] + [f"{c['cycle_seconds_under_profiler']:.3f}"])
        text += (
            f"\n\nthe cycle (before_step + after_step over one whole cycle of core_steps={cycle['core_steps']}, "
            f"per step) against the number of adapted Linear({cycle['width']}, {cycle['width']}) layers\n\n"
            + common.markdown_table(["layers", *keys, "cycle time under the profiler (s)"], rows)
        )
    return text


def verdicts(report: dict) -> list[str]:
    """The targets of the performance issues, checked on this run's figures."""
    timing, memory = report["timing"], report.get("memory") or {}
    lora = timing["lora_r8"]
    device = report["environment"]["device"]
    lines = []
    default = timing.get(DEFAULT_CYCLE)
    if default is not None and default.get("operator_calls_ratio_to_lora") is not None:
        r = default["operator_calls_ratio_to_lora"]
        lines.append(
            f"{DEFAULT_CYCLE} (the default cycle) operator calls per step, cycle included / LoRA's, on "
            f"{report['settings']['model']}: {r:.3f}x, target <= {OPS_TARGET}: "
            f"{'met' if r <= OPS_TARGET else 'NOT met'}"
        )
    cycle = (report.get("cycle_vs_layers") or {}).get("results", {})
    if "4" in cycle and "12" in cycle:
        r = cycle["12"]["per_step"]["operator_calls"] / cycle["4"]["per_step"]["operator_calls"]
        lines.append(
            f"the cycle's operator calls per step, 12 layers / 4 layers of one shape: {r:.3f}x, target <= "
            f"{CYCLE_SCALING_TARGET}: {'met' if r <= CYCLE_SCALING_TARGET else 'NOT met'}"
        )
    if not device.startswith("cuda"):
        lines.append(
            "GPU step time <= 1.10x LoRA and one cycle cheaper than one LoRA step on the GPU: pending (this run is on "
            f"{device}; run `overhead.py --device cuda`)"
        )
    for name, limit in TARGETS.items():
        t = timing.get(name)
        if t is None:
            why = "not in --methods" if report["settings"]["updater_available"] else "no TuckerRankUpdater"
            lines.append(f"{name}: not measured in this run ({why})")
            continue
        ratio = t["mean_ratio_to_lora"]
        whole = t.get("augmentations_in_window"), t.get("truncations_in_window")
        lines.append(
            f"{name} {device} step time, amortized (mean over the window / LoRA mean, {whole[0]} augmentation(s) and "
            f"{whole[1]} truncation(s) in the window): {ratio:.3f}x, target <= {limit}: "
            f"{'met' if ratio <= limit else 'NOT met'} (median step {t['median_ratio_to_lora']:.3f}x)"
        )
        if "mean_process_cpu_ratio_to_lora" in t and report["environment"]["device"] == "cpu":
            cpu_ratio = t["mean_process_cpu_ratio_to_lora"]
            lines.append(
                f"{name} step time in process CPU time (less sensitive to other jobs on a shared CPU), amortized: "
                f"{cpu_ratio:.3f}x, target <= {limit}: {'met' if cpu_ratio <= limit else 'NOT met'}"
            )
        full = t.get("full_cycle_rank_update_s")
        if full is not None:
            r = full / lora["median_step_s"]
            lines.append(
                f"{name} one full cycle on {device} (augment + truncate, all adapted layers): {full * 1e3:.0f} ms = "
                f"{r:.3f} LoRA steps, target < 1: {'met' if r < 1 else 'NOT met'}"
            )
    for name in ("tucker_c1", "tucker_c10", "tucker_fixed_r8"):
        m = memory.get(name)
        if m is not None:
            r = m["increase_ratio_to_lora"]
            lines.append(
                f"{name} peak memory increase / LoRA: {r:.3f}, target <= {MEMORY_TARGET}: "
                f"{'met' if r <= MEMORY_TARGET else 'NOT met'}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(parser, warmup=2)
    parser.add_argument("--steps", type=int, default=22, help="measured steps (use whole rank-update cycles)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps run by each memory subprocess")
    parser.add_argument(
        "--count-steps", type=int, default=22, help="steps counted with torch.profiler per method (whole cycles)"
    )
    parser.add_argument(
        "--cycle-layers", type=int, nargs="*", default=[4, 12, 24], help="layer counts of the cycle-cost measurement"
    )
    parser.add_argument("--cycle-width", type=int, default=768, help="width of the Linear layers of that measurement")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--methods", nargs="+", help="subset of the methods (lora_r8 is always included)")
    parser.add_argument("--adalora-total-step", type=int, default=1000)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top ops: Tucker vs LoRA")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--profile-rows", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 layers, batch 2 x seq 64, few steps")
    parser.add_argument("--output", type=Path, help="write the JSON report here (and the table next to it, .md)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.batch_size, args.seq_len = 2, 2, 64
        args.warmup, args.steps, args.memory_steps, args.count_steps = 1, 4, 2, 2
        args.cycle_layers, args.cycle_width = [4, 12], 64
    common.set_model(args.model)
    if args.steps < 1 or args.warmup < 0 or args.memory_steps < 1:
        parser.error("`--steps` and `--memory-steps` must be >= 1, `--warmup` >= 0")
    if args.memory_child:
        memory_child(args)
        return

    device = common.resolve_device(args.device)
    updater_available = find_updater() is not None
    names = method_names(updater_available)
    if args.methods:
        unknown = set(args.methods) - set(names)
        if unknown:
            parser.error(f"unknown or unavailable methods {sorted(unknown)}; available: {names}")
        names = ["lora_r8"] + [n for n in args.methods if n != "lora_r8"]
    notes = []
    if not updater_available:
        notes.append(
            "tucker_lora.rank_updater.TuckerRankUpdater not found: the method's rows (tucker_c1, tucker_c10) "
            "were not run; tucker_fixed_r8 has no rank update."
        )

    if args.profile:
        profile(args, device, ["lora_r8", "tucker_fixed_r8"] + (["tucker_c1"] if updater_available else []))
        return

    report = {
        "benchmark": "overhead",
        "environment": common.environment(device),
        "settings": {
            **common.model_settings(args),
            "steps": args.steps,
            "memory_steps": args.memory_steps,
            "count_steps": args.count_steps,
            "optimizer": f"AdamW lr {LR} wd {WEIGHT_DECAY}",
            "adalora_total_step": args.adalora_total_step,
            "memory_measure": (
                "torch.cuda.max_memory_allocated - allocated after build"
                if device.type == "cuda"
                else "peak RSS (VmHWM) - RSS after build, fresh subprocess per method"
            ),
            "updater_available": updater_available,
            "command": " ".join(sys.argv),
        },
        "targets": {
            "tucker_c10_step_ratio": TARGETS["tucker_c10"],
            "tucker_c1_step_ratio": TARGETS["tucker_c1"],
            "memory_ratio": MEMORY_TARGET,
            "full_cycle_vs_lora_step": 1.0,
            "operator_calls_vs_lora": OPS_TARGET,
            "cycle_calls_12_vs_4_layers": CYCLE_SCALING_TARGET,
        },
        "notes": notes,
    }
    report["timing"] = time_methods(args, device, names)
    if args.cycle_layers:
        results = op_counts.cycle_vs_layers(args.cycle_layers, args.cycle_width, 10, device)
        report["cycle_vs_layers"] = {
            "core_steps": 10,
            "width": args.cycle_width,
            "results": {str(k): v for k, v in results.items()},
        }
    report["memory"] = None if args.no_memory else measure_memory(args, names)
    report["environment"]["cpu_load_avg_after"] = list(__import__("os").getloadavg())
    text = tables(report)
    common.write_report(report, text, args.output)


if __name__ == "__main__":
    main()
