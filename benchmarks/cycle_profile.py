"""Where one rank-cycle event of `TuckerRankUpdater` spends its time and memory: augmentation and truncation.

A Tucker r=8 adapter (`core_steps` 2, `augment_start_step=0`, random initial core, `train_bases` as configured by
default) on the 72 matrices of a BERT-base- or DeBERTaV3-base-shaped model, AdamW; after one whole warm-up cycle, the
events of `--cycles` further cycles are measured, each as `before_step()` + `after_step()` of the step that ends with
it (the optimizer step between them excluded): wall and process CPU time, and on the CPU the peak resident set size
during the event over the resident size at its start (VmHWM, reset through /proc/self/clear_refs). One more cycle
runs under torch.profiler, whose top operators per event (in `after_step()`, where the event runs; `before_step()`
only copies the basis gradients) are printed and saved.

    python benchmarks/cycle_profile.py --model bert --layers 12 --batch-size 4 --seq-len 64 --output ...
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

CORE_STEPS = 2


def _status_bytes(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def build(args: argparse.Namespace, device: torch.device):
    from tucker_lora.rank_updater import TuckerRankUpdater

    config = common.tucker_config(8, init_weights=False, core_steps=CORE_STEPS, augment_start_step=0)
    model = common.peft_model(config, args.layers, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.01)
    return model, optimizer, TuckerRankUpdater(model, optimizer)


def run_cycle(model, optimizer, updater, batch, device, profiled: bool = False) -> dict:
    """One whole cycle; per event (`augment`, `truncate`) its wall and CPU seconds and peak RSS increase, or with
    `profiled` the torch.profiler operator averages of the event."""
    group = updater.groups[0]
    events = {}
    for _ in range(CORE_STEPS + 1):
        model(**batch).loss.backward()
        action = group.action(updater.step + 1, updater.total_steps)
        on_cpu = device.type == "cpu"
        if on_cpu:
            Path("/proc/self/clear_refs").write_text("5")
            rss = _status_bytes("VmRSS")
        wall, cpu = common.timed(updater.before_step, device)
        optimizer.step()
        prof = profile(activities=_activities(device)) if profiled and action else None
        if prof is not None:
            prof.start()
        more_wall, more_cpu = common.timed(updater.after_step, device)
        if prof is not None:
            prof.stop()
            events[action] = prof.key_averages()
        elif action:
            peak = _status_bytes("VmHWM") - rss if on_cpu else None
            events[action] = {"wall_s": wall + more_wall, "cpu_s": cpu + more_cpu, "peak_rss_increase_bytes": peak}
        optimizer.zero_grad(set_to_none=True)
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(parser, warmup=1)
    parser.add_argument("--cycles", type=int, default=3, help="measured cycles")
    parser.add_argument("--rows", type=int, default=15, help="operators shown per event")
    parser.add_argument("--output", type=Path, help="write the JSON report here (and the tables next to it, .md)")
    args = parser.parse_args()
    common.set_model(args.model)
    device = common.resolve_device(args.device)
    batch = common.synthetic_batch(args.batch_size, args.seq_len, device)
    model, optimizer, updater = build(args, device)
    environment = common.environment(device)
    for _ in range(args.warmup):
        run_cycle(model, optimizer, updater, batch, device)
    measured = [run_cycle(model, optimizer, updater, batch, device) for _ in range(args.cycles)]
    profiled = run_cycle(model, optimizer, updater, batch, device, profiled=True)
    environment["cpu_load_avg_after"] = list(os.getloadavg())
    summary = {}
    lines = [
        f"one rank-cycle event (before_step + after_step), Tucker r=8 core_steps={CORE_STEPS}, "
        f"{common.model_settings(args)['model']}, batch {args.batch_size} x seq {args.seq_len}, {device}, "
        f"{torch.get_num_threads()} thread(s), median over {args.cycles} cycles; load average "
        f"{environment['cpu_load_avg_1_5_15'][0]:.2f} before, {environment['cpu_load_avg_after'][0]:.2f} after",
        "",
        "| event | wall (ms) | process CPU (ms) | peak RSS increase during the event (MiB) |",
        "|---|---|---|---|",
    ]
    for event in ("augment", "truncate"):
        runs = [cycle[event] for cycle in measured]
        peaks = [r["peak_rss_increase_bytes"] for r in runs if r["peak_rss_increase_bytes"] is not None]
        summary[event] = {
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "max_peak_rss_increase_bytes": max(peaks) if peaks else None,
            "runs": runs,
        }
        peak = "-" if not peaks else f"{max(peaks) / 2**20:.1f}"
        s = summary[event]
        lines.append(f"| {event} | {s['median_wall_s'] * 1e3:.1f} | {s['median_cpu_s'] * 1e3:.1f} | {peak} |")
    for event, averages in profiled.items():
        table = averages.table(sort_by="self_cpu_time_total", row_limit=args.rows)
        summary[event]["profile_table"] = table
        title = f"### {event}: top {args.rows} operators by self CPU time (`after_step()` of one event, profiler)"
        lines += ["", title, "", "```", table.strip(), "```"]
    report = {
        "benchmark": "cycle_profile",
        "environment": environment,
        "settings": {**common.model_settings(args), "cycles": args.cycles, "command": " ".join(sys.argv)},
        "events": summary,
    }
    common.write_report(report, "\n".join(lines), args.output)


if __name__ == "__main__":
    main()
