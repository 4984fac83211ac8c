"""DreamBooth quality on the offline base: held-out denoising loss and class drift against active trainable parameters.

For each adapter setting, `recipes/dreambooth/train_dreambooth.py` trains on the subject with prior preservation and
one photo left out (`--heldout_image`); the held-out loss uses fixed seeded noise and timesteps, the same for every
run and training seed (`--heldout_seed`), so that the gain over the base is paired; the class drift is the mean
squared difference between adapted and base predictions on the class images with the class prompt. Settings:
Tucker at several tau, with convs (attention + resnet conv1/conv2) and attention-only, also with `--absorb_core` (the
attention adapters stepped as K = U C and V, the convs in the Tucker form), and PEFT LoRA at r = 2, 4, 8, with
flattened convs and attention-only. Writes JSON, a markdown table and a loss-vs-parameters figure.

The base is the tiny offline one (`recipes/dreambooth/offline_base.py`), not Stable Diffusion: read the figures as
a check of the machinery and a first comparison, not as DreamBooth quality on a real model.

    python benchmarks/dreambooth_quality.py --base outputs/dreambooth/base --seeds 0 1 2 --max_train_steps 300

`--jobs 2` runs two at a time (the CPU threads shared among them). A finished run (its `metrics.json` beside the
arguments it ran with) is reused, so an interrupted benchmark resumes and a report can be assembled from runs made
by separate invocations.

On a real base (the hub path), `--clip_model_name_or_path` / `--dino_model_name_or_path` add the DreamBooth paper's
CLIP-I, CLIP-T and DINO of `--num_validation_images` samples of `--validation_prompt` to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes" / "dreambooth"))

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
WITH_CONVS = [*ATTENTION, "conv1", "conv2"]
IMAGE_METRICS = ("clip_i", "clip_t", "dino")  # with --clip_model_name_or_path / --dino_model_name_or_path


def settings(taus: list[float], lora_ranks: list[int], tucker_rank: int, folded_taus: list[float]) -> list[dict]:
    found = []
    for targets, label in ((WITH_CONVS, "attn+conv"), (ATTENTION, "attn")):
        for tau in taus:
            found.append({"name": f"tucker tau={tau} {label}", "method": "tucker", "targets": targets,
                          "args": ["--method", "tucker", "--rank", str(tucker_rank), "--tau", str(tau)]})  # fmt: skip
        for tau in folded_taus:  # attention folded (K = U C and V), convs in the Tucker form
            found.append({"name": f"tucker folded tau={tau} {label}", "method": "tucker folded", "targets": targets,
                          "args": ["--method", "tucker", "--rank", str(tucker_rank), "--tau", str(tau),
                                   "--absorb_core"]})  # fmt: skip
        for rank in lora_ranks:
            found.append({"name": f"lora r={rank} {label}", "method": "lora", "targets": targets,
                          "args": ["--method", "lora", "--rank", str(rank)]})  # fmt: skip
    return found


def run_one(setting: dict, seed: int, options: argparse.Namespace, out: Path) -> dict:
    import train_dreambooth

    folder = out / "runs" / f"{setting['name'].replace(' ', '_').replace('=', '')}-seed{seed}"
    args = [
        "--pretrained_model_name_or_path", options.base, "--instance_data_dir", options.instance_data_dir,
        "--instance_prompt", options.instance_prompt, "--class_prompt", options.class_prompt,
        "--with_prior_preservation", "--class_data_dir", str(out / "class"), "--num_class_images", "8",
        "--heldout_image", options.heldout_image, "--center_crop", "--random_flip",
        "--heldout_seed", str(options.heldout_seed),
        "--max_train_steps", str(options.max_train_steps), "--learning_rate", str(options.learning_rate),
        "--checkpointing_steps", str(options.max_train_steps + 1), "--logging_steps", "10", "--seed", str(seed),
        "--output_dir", str(folder), "--target_modules", *setting["targets"], *setting["args"],
    ]  # fmt: skip
    for name in ("clip_model_name_or_path", "dino_model_name_or_path"):
        if getattr(options, name):
            args += [f"--{name}", getattr(options, name)]
    if options.clip_model_name_or_path or options.dino_model_name_or_path:
        args += ["--validation_prompt", options.validation_prompt,
                 "--num_validation_images", str(options.num_validation_images)]  # fmt: skip
    metrics = reused_metrics(folder, args)
    if metrics is None:
        metrics = train_dreambooth.main(args)
        (folder / "benchmark_args.json").write_text(json.dumps(args))
    scores = metrics["image_metrics"] or {}
    return {
        "setting": setting["name"], "method": setting["method"], "seed": seed,
        "active_params": metrics["active_trainable_params"], "heldout_loss": metrics["heldout_loss"],
        "heldout_loss_base": metrics["heldout_loss_base"], "class_drift": metrics["class_drift"],
        "final_instance_loss": metrics["history"][-1]["instance_loss"], "wall_time_s": metrics["wall_time_s"],
        **{name: scores.get(name) for name in IMAGE_METRICS},
    }  # fmt: skip


def reused_metrics(folder: Path, args: list[str]) -> dict | None:
    """The metrics of a finished run of exactly these arguments (so that an interrupted benchmark resumes)."""
    metrics_path, args_path = folder / "metrics.json", folder / "benchmark_args.json"
    if metrics_path.is_file() and args_path.is_file() and json.loads(args_path.read_text()) == args:
        return json.loads(metrics_path.read_text())
    return None


def _start_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # the recipes' path comes with this module's import in the worker


def run_all(tasks: list[tuple[dict, int]], options: argparse.Namespace, out: Path) -> list[dict]:
    """Every (setting, seed), `options.jobs` at a time. The first runs alone: it samples the class images that every
    run then shares."""
    from tqdm.auto import tqdm

    progress = tqdm(total=len(tasks), desc="runs (setting x seed)")
    rows = []

    def done(row: dict) -> None:
        rows.append(row)
        progress.write(json.dumps(row))
        progress.update()

    done(run_one(*tasks[0], options, out))
    if options.jobs == 1:
        for setting, seed in tasks[1:]:
            done(run_one(setting, seed, options, out))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // options.jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            options.jobs, mp_context=context, initializer=_start_worker, initargs=(threads,)
        ) as pool:
            futures = [pool.submit(run_one, setting, seed, options, out) for setting, seed in tasks[1:]]
            for future in futures:
                done(future.result())
    progress.close()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    for name in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == name]
        losses = [r["heldout_loss"] for r in group]
        gains = [r["heldout_loss_base"] - r["heldout_loss"] for r in group]  # paired: the same draws for every run
        table.append(
            {
                "setting": name,
                "method": group[0]["method"],
                "seeds": len(group),
                "active_params": statistics.fmean(r["active_params"] for r in group),
                "heldout_loss": statistics.fmean(losses),
                "heldout_loss_sd": statistics.stdev(losses) if len(group) > 1 else None,
                "heldout_loss_base": group[0]["heldout_loss_base"],
                "heldout_gain": statistics.fmean(gains),
                "heldout_gain_sd": statistics.stdev(gains) if len(group) > 1 else None,
                "class_drift": statistics.fmean(r["class_drift"] for r in group),
                **{
                    name: statistics.fmean(r[name] for r in group) if group[0][name] is not None else None
                    for name in IMAGE_METRICS
                },
            }
        )
    return table


def write_report(table: list[dict], rows: list[dict], options: argparse.Namespace, out: Path, seconds: float) -> None:
    lines = [
        "# DreamBooth quality on the tiny offline base (not Stable Diffusion)", "",
        f"Subject {options.instance_data_dir}, held-out photo {options.heldout_image}, "
        f"{options.max_train_steps} steps, lr {options.learning_rate}, seeds {options.seeds}, "
        f"{seconds / 60:.1f} min in all.", "",
    ]  # fmt: skip
    scored = [name for name in IMAGE_METRICS if table[0][name] is not None]
    lines += [
        f"Every run is scored on the same held-out draws (`--heldout_seed {options.heldout_seed}`); the gain is the "
        "base's held-out loss minus the adapted one's, in units of 1e-4, mean ± std over the training seeds.", "",
        "| setting | seeds | active params | held-out loss (base) | held-out loss | held-out gain (1e-4) "
        "| class drift |"
        + "".join(f" {name.upper().replace('_', '-')} |" for name in scored),
        "|---|---|---|---|---|---|---|" + "---|" * len(scored),
    ]  # fmt: skip
    for r in table:
        sd = f" ± {r['heldout_loss_sd']:.4f}" if r["heldout_loss_sd"] is not None else ""
        gain_sd = f" ± {r['heldout_gain_sd'] * 1e4:.2f}" if r["heldout_gain_sd"] is not None else ""
        lines.append(f"| {r['setting']} | {r['seeds']} | {r['active_params']:,.0f} | {r['heldout_loss_base']:.4f} | "
                     f"{r['heldout_loss']:.4f}{sd} | {r['heldout_gain'] * 1e4:.2f}{gain_sd} | {r['class_drift']:.5f} |"
                     + "".join(f" {r[name]:.4f} |" for name in scored))  # fmt: skip
    (out / "dreambooth_quality.md").write_text("\n".join(lines) + "\n")
    (out / "dreambooth_quality.json").write_text(json.dumps({"options": vars(options), "table": table, "runs": rows},
                                                            indent=2))  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("tucker", "o"), ("tucker folded", "^"), ("lora", "s")):
        for label, style in (("attn+conv", "-"), ("attn", "--")):
            curve = [r for r in table if r["method"] == method and r["setting"].endswith(" " + label)]
            points = sorted((r["active_params"], r["heldout_gain"] * 1e4, (r["heldout_gain_sd"] or 0.0) * 1e4)
                            for r in curve)  # fmt: skip
            if points:
                x, y, err = zip(*points)
                axis.errorbar(x, y, yerr=err, marker=marker, linestyle=style, capsize=3, label=f"{method} {label}")
    axis.axhline(0.0, color="grey", linewidth=0.8, label="base (no adapter)")
    axis.set_xscale("log")
    axis.set_xlabel("active trainable parameters")
    axis.set_ylabel("held-out loss gain over the base (1e-4, higher is better)")
    axis.set_title("DreamBooth on the tiny offline base (not Stable Diffusion)")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / "dreambooth_quality.png", dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="outputs/dreambooth/base")
    parser.add_argument("--instance_data_dir", default="../shared/data/dreambooth/dog")
    parser.add_argument("--instance_prompt", default="a photo of sks dog")
    parser.add_argument("--class_prompt", default="a photo of dog")
    parser.add_argument("--heldout_image", default="04.jpg")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heldout_seed", type=int, default=0, help="the held-out draws, the same for every run")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.2, 0.4])
    parser.add_argument("--folded_taus", type=float, nargs="*", default=[0.1], help="Tucker with --absorb_core")
    parser.add_argument("--lora_ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tucker_rank", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--only", nargs="*", default=None, help="run only the settings with these names")
    parser.add_argument("--output_dir", default="outputs/benchmarks/dreambooth_quality")
    parser.add_argument("--clip_model_name_or_path", default=None, help="CLIP-I and CLIP-T (see train_dreambooth.py)")
    parser.add_argument("--dino_model_name_or_path", default=None, help="DINO (see train_dreambooth.py)")
    parser.add_argument("--validation_prompt", default="a photo of sks dog", help="the prompt the metrics score")
    parser.add_argument("--num_validation_images", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, the CPU threads shared among them")
    options = parser.parse_args(argv)
    if options.jobs < 1:
        raise ValueError(f"`jobs` must be >= 1; got {options.jobs}.")
    if not os.path.isdir(options.base):
        raise ValueError(
            f"`base` must be an offline base folder (build it with run_offline.sh); got {options.base!r}."
        )
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    tasks = [
        (setting, seed)
        for setting in settings(options.taus, options.lora_ranks, options.tucker_rank, options.folded_taus)
        if not options.only or setting["name"] in options.only
        for seed in options.seeds
    ]
    if not tasks:
        raise ValueError(f"`only` names no setting of this benchmark; got {options.only}.")
    rows = run_all(tasks, options, out)
    write_report(summarize(rows), rows, options, out, time.time() - start)
    print((out / "dreambooth_quality.md").read_text())


if __name__ == "__main__":
    main()
