"""Score a finished `finetune.py` run's saved adapter on its task's dev split(s), without training again.

```bash
# choose settings on held-out training rows (--holdout_rows), then score the chosen runs' adapters on dev
python recipes/glue/evaluate_run.py outputs/glue/sst2-minilm/tucker --output_dir outputs/glue/sst2-minilm/tucker-dev
```

A run trained with `--holdout_rows` trains on exactly the rows (and in the order) of the same command without
it: only the rows it is scored on differ. So the models compared on held-out rows can be scored on dev afterwards,
the dev figure comes from the models selected without looking at dev, and no run is trained twice.

Writes to `--output_dir` (never the run's own folder: its record stays as it was) a `metrics.json` (the run's
report with the dev scores in place of its own, and `evaluated_from`) and a `predictions.json` in the recipe's
format, so `benchmarks/paired_rows.py` compares evaluated folders as it compares runs. The model, the tokenizer, the
data folder and `max_seq_length` come from the run's `metrics.json`; `--data_dir` and `--model_name_or_path`
override them (a run moved to another machine).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from finetune import write_json_atomically
from metrics import compute_metrics, row_record
from peft import PeftModel
from tasks import get_task, load_glue
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finetune.py output folder (metrics.json and adapter/)")
    parser.add_argument("--output_dir", required=True, help="where metrics.json and predictions.json go")
    parser.add_argument("--split", nargs="+", help="dev split(s) of the task; default: all of them")
    parser.add_argument("--data_dir", help="GLUE TSV folder; default: the run's")
    parser.add_argument("--model_name_or_path", help="the base model; default: the run's")
    parser.add_argument("--batch_size", type=int, default=128)
    return parser.parse_args(argv)


def read_run(folder: str) -> dict:
    path = Path(folder)
    missing = [name for name in ("metrics.json", "adapter/adapter_config.json") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"`run` must be a finished finetune.py output folder; {folder} has no {missing}")
    return json.loads((path / "metrics.json").read_text(encoding="utf-8"))


def logits_of(
    model: torch.nn.Module, tokenizer, texts: tuple[list[str], ...], max_length: int, batch_size: int, desc: str
):
    """The model's logits for every row, in row order (batches padded to their longest row, as the recipe's)."""
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(texts[0]), batch_size), desc=desc, unit="batch"):
            chunk = [column[start : start + batch_size] for column in texts]
            batch = tokenizer(*chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            out.append(model(**batch).logits.float())
    return torch.cat(out).numpy()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = read_run(args.run)
    if Path(args.output_dir).resolve() == Path(args.run).resolve():
        raise ValueError(
            f"`--output_dir` must not be the run's own folder (its record would be replaced); got {args.run}"
        )
    run_args = report["args"]
    task = get_task(report["task"])
    splits = args.split or list(task.eval_splits)
    unknown = [name for name in splits if name not in task.eval_splits]
    if unknown:
        raise ValueError(f"`--split` must name dev splits of {task.name} ({list(task.eval_splits)}); got {unknown}")
    if args.batch_size <= 0:
        raise ValueError(f"`--batch_size` must be a positive integer; got {args.batch_size}")

    import tucker_lora  # noqa: F401  (registers the Tucker method with PEFT)

    model_path = args.model_name_or_path or run_args["model"]["model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(run_args["model"].get("tokenizer_name") or model_path)
    base = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
    )
    model = PeftModel.from_pretrained(base, os.path.join(args.run, "adapter")).eval()

    raw = load_glue(task, args.data_dir or run_args["data"]["data_dir"])
    results, row_predictions = {}, {}
    for name in splits:
        rows = raw[name]
        texts = (rows["sentence1"], rows["sentence2"]) if task.is_pair else (rows["sentence1"],)
        logits = logits_of(model, tokenizer, texts, run_args["data"]["max_seq_length"], args.batch_size, name)
        labels = np.asarray(rows["label"])
        row_predictions[name], auc = row_record(task.name, logits, labels)
        results[name] = compute_metrics(task.name, np.asarray(row_predictions[name]["predictions"]), labels)
        if auc is not None:
            results[name]["roc_auc"] = auc

    main_split = splits[0]
    report = {
        **report,
        "evaluated_from": str(Path(args.run).resolve()),
        "num_eval_samples": {name: len(raw[name]) for name in splits},
        "eval_on": main_split,
        "metrics": results,
        "main_metric": {"name": task.main_metric, "split": main_split, "value": results[main_split][task.main_metric]},
        "majority_baseline": None,  # the run's training rows are not rebuilt here
    }
    os.makedirs(args.output_dir, exist_ok=True)
    write_json_atomically(os.path.join(args.output_dir, "predictions.json"), row_predictions, indent=None)
    write_json_atomically(os.path.join(args.output_dir, "metrics.json"), report)
    print(f"{task.name} {main_split} {task.main_metric}: {report['main_metric']['value']:.4f}   (all: {results})")
    return report


if __name__ == "__main__":
    main()
