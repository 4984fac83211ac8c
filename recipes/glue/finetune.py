"""Fine-tune a sequence classifier on a GLUE task with a Tucker adapter, LoRA or AdaLoRA.

One script for the three methods: same data, head, schedule and evaluation; only the adapter differs.

```bash
# the hyperparameters of one task (DeBERTaV3-base settings), the exact command is in each config's "_command"
python recipes/glue/finetune.py --config recipes/glue/configs/rte.json --method tucker \\
    --data_dir ../shared/data/glue --output_dir outputs/glue/rte-tucker
# any argument given on the command line overrides the config file
python recipes/glue/finetune.py --config recipes/glue/configs/rte.json --method lora --max_steps 20 ...
# several processes (CPU: add --use_cpu true)
torchrun --nproc_per_node 2 recipes/glue/finetune.py --config recipes/glue/configs/rte.json ...
```

Writes to `--output_dir`: `metrics.json` (dev metrics, for two-class tasks also ROC AUC, the majority-class score,
trainable parameters, final ranks, wall time, versions), `predictions.json` (per evaluated split, each row's
prediction, label and, for two-class tasks, score `logit_1 - logit_0`, in row order, for
`benchmarks/paired_rows.py`), `adapter/` (the PEFT adapter with the trained classifier head), `trainer_state.json`
(the logs) and `ranks.png` (Tucker and AdaLoRA).
"""

import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import datasets
import torch
import transformers
from callbacks import AdaLoraAllocatorCallback, CompactProgressCallback, adalora_ranks
from metrics import compute_metrics, majority_baseline, predictions_from_logits, row_record
from peft import AdaLoraConfig, LoraConfig, PeftConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tasks import TASKS, get_task, held_out_rows, load_glue, take_rest, take_subset, without_shared_phrases
from torch.utils.data import SequentialSampler
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import ProgressCallback

logger = logging.getLogger("glue_finetune")

METHODS = ("tucker", "lora", "adalora")
# `--rank` when not given: AdaLoRA starts above its target (the paper: init_r 12 for target_r 8), so it has a
# budget to cut
DEFAULT_RANKS = {"tucker": 8, "lora": 8, "adalora": 12}
# Adapted linear layers and trained head per model type. DeBERTa's list is the authors' (METHOD.md section 8):
# "output.dense" matches both the attention output and the feed-forward output projection.
TARGET_MODULES = {
    "bert": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense"],
}
HEAD_MODULES = {"bert": ["classifier"], "roberta": ["classifier"], "deberta-v2": ["classifier", "pooler"]}
# Trainer settings this recipe changes from transformers' defaults (the config file and command line still win).
PARAMETER_COUNTING = {
    "tucker": "tucker_lora.count_parameters: active core block + active basis columns + head",
    "lora": "every parameter with requires_grad: A, B and the head",
    "adalora": "allocated budget: sum over layers of rank * (in + out + 1) plus the head; trainable_parameters is "
    "the init_r allocation the optimizer holds",
}
TRAINER_DEFAULTS = ["--report_to", "none", "--save_strategy", "no", "--logging_steps", "10"]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="microsoft/deberta-v3-base", metadata={"help": "Pretrained model (hub id or local folder)."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataArguments:
    task: str = field(metadata={"help": f"GLUE task, one of {sorted(TASKS)}."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder in the GLUE download's layout (<data_dir>/SST-2/train.tsv, ...); default: the hub."},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated (padding is dynamic)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N rows of a permutation of the train set (seeded)."}
    )
    train_subset_seed: int = field(
        default=42, metadata={"help": "Seed of that permutation; fixed apart from --seed so seeds share a subset."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N dev rows."})
    holdout_fraction: float = field(
        default=0.0,
        metadata={
            "help": "If > 0, hold out this fraction of the (subset) train set and evaluate there instead of on dev "
            "(for choosing hyperparameters without looking at dev)."
        },
    )
    holdout_rows: int | None = field(
        default=None,
        metadata={
            "help": "If set, evaluate on this many train rows from outside the --max_train_samples subset instead of "
            "on dev: the run trains on exactly the rows it would otherwise, so a choice made here carries over."
        },
    )
    holdout_min_words: int = field(
        default=0,
        metadata={
            "help": "With --holdout_rows: draw them only from rows whose first sentence has at least this many words "
            "(SST-2's train set is mostly short phrases, its dev set whole sentences)."
        },
    )
    holdout_disjoint: bool = field(
        default=True,
        metadata={
            "help": "With --holdout_rows or --holdout_fraction: leave out held-out rows that share a phrase with the "
            "training rows (contain one of >= 4 words, or lie inside one): SST-2's rows are phrases of the same "
            "parsed sentences, and without this most long held-out rows repeat training text, which dev never does."
        },
    )
    holdout_whole_sentences: bool = field(
        default=False,
        metadata={
            "help": "With --holdout_rows: only rows that lie inside no longer row of the train set, i.e. SST-2's "
            "whole sentences (its train set also holds every phrase of them); dev's rows are whole sentences."
        },
    )


@dataclass
class AdapterArguments:
    method: str = field(default="tucker", metadata={"help": f"Adapter, one of {list(METHODS)}."})
    rank: int | None = field(
        default=None,
        metadata={"help": "Tucker: initial rank r; LoRA: rank r (default 8); AdaLoRA: init_r (default 12)."},
    )
    alpha: float = field(default=16.0, metadata={"help": "Scaling numerator (s = alpha / r)."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter's input."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Default: per model type."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Trained head; default: per model."})
    tau: float = field(default=0.1, metadata={"help": "Tucker: relative truncation tolerance."})
    r_max: int = field(default=16, metadata={"help": "Tucker: largest rank per mode."})
    r_min: int = field(default=1, metadata={"help": "Tucker: smallest rank per mode."})
    core_steps: int = field(default=10, metadata={"help": "Tucker: core-only optimizer steps per rank cycle (c)."})
    augment_start_step: int = field(default=10, metadata={"help": "Tucker: first step that augments the bases."})
    train_bases: bool = field(
        default=True, metadata={"help": "Tucker: the optimizer steps the bases too (re-orthonormalized every cycle)."}
    )
    absorb_core: bool = field(
        default=False, metadata={"help": "Tucker: linear adapters stepped as K = U C and V, like LoRA's B and A."}
    )
    in_basis_lr_ratio: float = field(
        default=1.0,
        metadata={"help": "Tucker, with --absorb_core: each step of the input bases V is this many times the rate's."},
    )
    freeze_ranks_after: float | None = field(
        default=None,
        metadata={"help": "Tucker: stop rank updates after this many steps (>= 1) or this fraction (< 1)."},
    )
    core_lr_ratio: float = field(
        default=1.0, metadata={"help": "Tucker: the cores' learning rate over --learning_rate (a group of its own)."}
    )
    tau_warmup: float | None = field(
        default=None,
        metadata={"help": "Tucker: tau ramps up from 0 over this many steps (>= 1) or this fraction (< 1)."},
    )
    param_budget: int | None = field(
        default=None,
        metadata={
            "help": "Tucker: the most active adapter parameters after every truncation: core entries + basis columns "
            "of the adapted layers; the trained head (modules_to_save) is not counted. --tau still applies (the "
            "stricter wins): pass a small --tau (e.g. 0.01) to let the budget decide the ranks."
        },
    )
    budget_fraction_of_lora: float | None = field(
        default=None,
        metadata={
            "help": "Tucker: --param_budget as this fraction of what LoRA of rank --reference_lora_r (default 8) "
            "trains on the same adapted layers, sum of r * (in + out), the head not counted (metrics.json's "
            "lora_r8_parameters counts the head too; lora_r8_adapter_parameters does not); rounded down."
        },
    )
    budget_ramp: float | None = field(
        default=None,
        metadata={
            "help": "Tucker: reach the budget over this many steps (>= 1) or this fraction of the run (< 1), "
            "cubically from the adapter at r_max everywhere; default: the budget applies from the first truncation."
        },
    )
    adalora_target_r: int = field(default=8, metadata={"help": "AdaLoRA: target average rank."})
    adalora_tinit: float = field(
        default=0.1, metadata={"help": "AdaLoRA: warmup before allocation, fraction of steps."}
    )
    adalora_tfinal: float = field(
        default=0.3, metadata={"help": "AdaLoRA: final fixed-rank phase, fraction of steps."}
    )
    adalora_delta_t: int = field(default=10, metadata={"help": "AdaLoRA: steps between two budget allocations."})
    adalora_beta1: float = field(default=0.85, metadata={"help": "AdaLoRA: EMA of sensitivity."})
    adalora_beta2: float = field(default=0.85, metadata={"help": "AdaLoRA: EMA of uncertainty."})
    adalora_orth_reg_weight: float = field(default=0.1, metadata={"help": "AdaLoRA: orthogonality penalty."})
    reference_lora_r: int = field(default=8, metadata={"help": "Rank of the LoRA parameter count reported alongside."})


def config_to_argv(path: str, method: str) -> list[str]:
    """Flatten a task config (`common` plus the `method` section; keys starting with `_` are notes) into arguments."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    sections = {key: value for key, value in config.items() if not key.startswith("_")}
    unknown = set(sections) - {"common", *METHODS}
    if unknown:
        raise ValueError(f"`--config` sections must be among {['common', *METHODS]}; got {sorted(unknown)} in {path}")
    argv = []
    for key, value in {**sections.get("common", {}), **sections.get(method, {})}.items():
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return argv


def _split_equals(arg: str) -> list[str]:
    """`--config=x` and `--method=x` as two words, so that the config file's section can be chosen before parsing."""
    for name in ("--config=", "--method="):
        if arg.startswith(name):
            return [name[:-1], arg[len(name) :]]
    return [arg]


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, AdapterArguments, TrainingArguments]:
    """Parse the command line; `--config FILE` supplies defaults that the other arguments override."""
    argv = [part for arg in (sys.argv[1:] if argv is None else argv) for part in _split_equals(arg)]
    prefix = list(TRAINER_DEFAULTS)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("`--config` must be followed by a JSON file path")
        path = argv[i + 1]
        del argv[i : i + 2]
        method = argv[argv.index("--method") + 1] if "--method" in argv[:-1] else "tucker"
        prefix += config_to_argv(path, method)
    parser = HfArgumentParser((ModelArguments, DataArguments, AdapterArguments, TrainingArguments))
    model_args, data_args, adapter_args, training_args = parser.parse_args_into_dataclasses(args=prefix + argv)
    if adapter_args.rank is None:
        adapter_args.rank = DEFAULT_RANKS.get(adapter_args.method, DEFAULT_RANKS["lora"])
    return model_args, data_args, adapter_args, training_args


def check_args(data_args: DataArguments, adapter_args: AdapterArguments, training_args: TrainingArguments) -> None:
    get_task(data_args.task)
    if adapter_args.method not in METHODS:
        raise ValueError(f"`--method` must be one of {list(METHODS)}; got {adapter_args.method!r}")
    if not 0.0 <= data_args.holdout_fraction < 1.0:
        raise ValueError(f"`--holdout_fraction` must be in [0, 1); got {data_args.holdout_fraction}")
    if data_args.holdout_rows is not None:
        if data_args.holdout_fraction > 0:
            raise ValueError(
                "`--holdout_rows` and `--holdout_fraction` are two ways to hold rows out; give one; got "
                f"{data_args.holdout_rows} and {data_args.holdout_fraction}"
            )
        if data_args.holdout_rows <= 0:
            raise ValueError(f"`--holdout_rows` must be a positive integer; got {data_args.holdout_rows}")
        if data_args.max_train_samples is None:
            raise ValueError("`--holdout_rows` takes rows outside the --max_train_samples subset; set that too")
    if not 0 < adapter_args.core_lr_ratio < math.inf:
        raise ValueError(f"`--core_lr_ratio` must be a finite number > 0; got {adapter_args.core_lr_ratio}")
    if data_args.holdout_whole_sentences and data_args.holdout_rows is None:
        raise ValueError("`--holdout_whole_sentences` chooses among the `--holdout_rows`; set that too")
    if data_args.holdout_min_words < 0:
        raise ValueError(f"`--holdout_min_words` must be >= 0; got {data_args.holdout_min_words}")
    for name in ("adalora_tinit", "adalora_tfinal"):
        value = getattr(adapter_args, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"`--{name}` must be a fraction of the training steps in [0, 1); got {value}")
    if adapter_args.method == "adalora" and adapter_args.adalora_target_r >= adapter_args.rank:
        raise ValueError(
            "`--adalora_target_r` must be below `--rank` (AdaLoRA's init_r) so there is a budget to cut; got "
            f"{adapter_args.adalora_target_r} >= {adapter_args.rank}"
        )
    if adapter_args.adalora_tinit + adapter_args.adalora_tfinal >= 1.0:
        raise ValueError(
            "`--adalora_tinit` + `--adalora_tfinal` must be below 1 to leave a budgeting phase; got "
            f"{adapter_args.adalora_tinit} + {adapter_args.adalora_tfinal}"
        )
    budget = {k: getattr(adapter_args, k) for k in ("param_budget", "budget_fraction_of_lora", "budget_ramp")}
    if adapter_args.method != "tucker" and any(v is not None for v in budget.values()):
        given = {k: v for k, v in budget.items() if v is not None}
        raise ValueError(
            f"the parameter budget flags are for `--method tucker`; got {given} with {adapter_args.method}"
        )
    if budget["param_budget"] is not None and budget["budget_fraction_of_lora"] is not None:
        raise ValueError(
            "give `--param_budget` or `--budget_fraction_of_lora`, not both; got "
            f"{budget['param_budget']} and {budget['budget_fraction_of_lora']}"
        )
    fraction = budget["budget_fraction_of_lora"]
    if fraction is not None and not 0.0 < fraction < math.inf:
        raise ValueError(f"`--budget_fraction_of_lora` must be a number > 0; got {fraction}")
    if training_args.output_dir is None:
        raise ValueError("`--output_dir` must be given; got None")


def total_training_steps(num_examples: int, args: TrainingArguments) -> int:
    """Optimizer steps the Trainer will take (needed up front by AdaLoRA's budget schedule)."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(num_examples / (args.per_device_train_batch_size * args.world_size))
    steps_per_epoch = max(batches // args.gradient_accumulation_steps, 1)
    return math.ceil(args.num_train_epochs * steps_per_epoch)


def steps_or_fraction(value: float | None) -> int | float | None:
    """A command-line value meaning optimizer steps when >= 1 (an int for the config) and a fraction of the run
    below 1."""
    return int(value) if value is not None and value >= 1 else value


def build_adapter(
    adapter_args: AdapterArguments, model_type: str, total_steps: int
) -> tuple[PeftConfig, list[TrainerCallback]]:
    """The PEFT config of `--method` and the callbacks that method needs under Trainer."""
    targets = adapter_args.target_modules or TARGET_MODULES.get(model_type)
    heads = adapter_args.modules_to_save or HEAD_MODULES.get(model_type)
    if targets is None or heads is None:
        raise ValueError(
            f"`--target_modules` and `--modules_to_save` must be given for model type {model_type!r}; defaults exist "
            f"for {sorted(TARGET_MODULES)}"
        )
    common = {"task_type": "SEQ_CLS", "target_modules": targets, "modules_to_save": heads}
    if adapter_args.method == "tucker":
        import tucker_lora  # registers the TUCKER PEFT type

        freeze = steps_or_fraction(adapter_args.freeze_ranks_after)
        warmup = steps_or_fraction(adapter_args.tau_warmup)
        # with --budget_fraction_of_lora the budget is set once the adapted layers are known (`set_tucker_budget`)
        budget = {
            "param_budget": adapter_args.param_budget,
            "budget_ramp": steps_or_fraction(adapter_args.budget_ramp),
        }
        config = tucker_lora.TuckerAdapterConfig(
            **common,
            r=adapter_args.rank,
            r_max=adapter_args.r_max,
            r_min=adapter_args.r_min,
            tau=adapter_args.tau,
            alpha=adapter_args.alpha,
            dropout=adapter_args.dropout,
            core_steps=adapter_args.core_steps,
            augment_start_step=adapter_args.augment_start_step,
            freeze_ranks_after=freeze,
            tau_warmup=warmup,
            train_bases=adapter_args.train_bases,
            absorb_core=adapter_args.absorb_core,
            in_basis_lr_ratio=adapter_args.in_basis_lr_ratio,
            **(budget if adapter_args.budget_fraction_of_lora is None else {}),
        )
        return config, [tucker_lora.TuckerRankCallback()]
    if adapter_args.method == "lora":
        config = LoraConfig(
            **common, r=adapter_args.rank, lora_alpha=adapter_args.alpha, lora_dropout=adapter_args.dropout
        )
        return config, []
    tinit = int(adapter_args.adalora_tinit * total_steps)
    tfinal = int(adapter_args.adalora_tfinal * total_steps)
    if tinit >= total_steps - tfinal:
        raise ValueError(
            f"AdaLoRA needs a budgeting phase: `--max_steps`/epochs give {total_steps} steps, too few for "
            f"tinit={tinit} and tfinal={tfinal}; train longer"
        )
    config = AdaLoraConfig(
        **common,
        init_r=adapter_args.rank,
        target_r=adapter_args.adalora_target_r,
        lora_alpha=adapter_args.alpha,
        lora_dropout=adapter_args.dropout,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=adapter_args.adalora_delta_t,
        beta1=adapter_args.adalora_beta1,
        beta2=adapter_args.adalora_beta2,
        orth_reg_weight=adapter_args.adalora_orth_reg_weight,
        total_step=total_steps,
    )
    return config, [AdaLoraAllocatorCallback(log_every=adapter_args.adalora_delta_t)]


def start_regression_at_mean(model: torch.nn.Module, mean: float) -> None:
    """Starts a one-output regression head at the training labels' mean (every method alike): from a bias of 0, Adam
    moves it by about the learning rate per step, so a short STS-B run (scores 0-5, mean ~2.7) never got there."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    if not heads or heads[-1].bias is None:
        raise ValueError(
            f"a regression model needs a one-output Linear head with a bias; {type(model).__name__} has none"
        )
    with torch.no_grad():
        heads[-1].bias.fill_(mean)


def head_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters of the trained head (PEFT's `modules_to_save` copies)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n)


def lora_parameters(model: torch.nn.Module, r: int) -> int:
    """What LoRA of rank `r` on the same adapted layers, plus the same head, would train: r * (in + out) each."""
    total = head_parameters(model)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            total += r * (base.in_features + base.out_features)
    return total


def set_tucker_budget(model: torch.nn.Module, adapter_args: AdapterArguments) -> int | None:
    """Puts `--budget_fraction_of_lora` (times LoRA's count on the adapted layers, head excluded) into the model's
    Tucker config as `param_budget` (with `--budget_ramp`), checked as any config value; returns the budget in use."""
    config = model.peft_config["default"]
    if adapter_args.budget_fraction_of_lora is not None:
        reference = lora_parameters(model, adapter_args.reference_lora_r) - head_parameters(model)
        budget = math.floor(adapter_args.budget_fraction_of_lora * reference)
        ramp = steps_or_fraction(adapter_args.budget_ramp)
        model.peft_config["default"] = config = replace(config, param_budget=budget, budget_ramp=ramp)
    return config.param_budget


def parameter_counts(model: torch.nn.Module, method: str) -> dict[str, int]:
    """`trainable`: numel of every parameter that requires grad. `active`: what the adapter really uses.

    Tucker: `tucker_lora.count_parameters` (active core block + active basis columns + head). LoRA: all trainable
    parameters. AdaLoRA: the allocated budget, sum over layers of rank * (in + out + 1) for the kept singular
    triplets (A row, B column, E entry) plus the head; the optimizer still holds init_r triplets per layer.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "tucker":
        import tucker_lora

        active = tucker_lora.count_parameters(model)
    elif method == "adalora":
        ranks = adalora_ranks(model)
        layers = dict(model.base_model.model.named_modules())
        active = head_parameters(model)
        for name, rank in ranks.items():
            base = layers[name].get_base_layer()
            active += rank * (base.in_features + base.out_features + 1)
    else:
        active = trainable
    return {"trainable": trainable, "active": active}


def final_ranks(model: torch.nn.Module, method: str, r: int) -> dict[str, list[int] | int]:
    if method == "tucker":
        import tucker_lora

        return {name: list(ranks) for name, ranks in tucker_lora.get_ranks(model).items()}
    if method == "adalora":
        return adalora_ranks(model)
    return {
        name.removeprefix("base_model.model."): r for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)
    }


def plot_adalora_budget(history: list[tuple[int, int]], path: str) -> str | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, totals = zip(*history)
    ax.plot(steps, totals)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("total allocated rank")
    ax.set_title("AdaLoRA rank budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "datasets", "accelerate", "tucker-lora"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    try:
        found["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        found["commit"] = "unknown"
    return found


def adapter_fingerprint(model: torch.nn.Module) -> float:
    """Sum of every trainable value in float64: equal across processes when they hold the same adapter."""
    return float(sum(p.detach().double().sum().item() for p in model.parameters() if p.requires_grad))


def write_json_atomically(path: str, value: object, indent: int | None = 2) -> None:
    """Write `value` as JSON to `path` through a temporary file: an interrupted write leaves no truncated file."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=indent, default=str)
    os.replace(partial, path)


def gather_across_processes(value: object) -> list[object]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


class GlueTrainer(Trainer):
    """Trainer's AdamW, with the Tucker cores in parameter groups of their own at `core_lr_ratio` times the rate, and
    evaluation in row order."""

    def __init__(self, *args, core_lr_ratio: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.core_lr_ratio = core_lr_ratio

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.core_lr_ratio != 1.0:
            cores = {id(p) for n, p in self.model.named_parameters() if ".tucker_core." in n}
            for group in list(optimizer.param_groups):
                moved = [p for p in group["params"] if id(p) in cores]
                if moved:
                    group["params"] = [p for p in group["params"] if id(p) not in cores]
                    optimizer.add_param_group({**group, "params": moved, "lr": group["lr"] * self.core_lr_ratio})
        return optimizer

    def _get_eval_sampler(self, eval_dataset) -> torch.utils.data.Sampler | None:
        # Trainer groups evaluation rows by length (in a seeded random order) when training does: same scores, but
        # predictions.json must list the rows in their order, the same for every seed and method. One process:
        # sequential; several: None, Accelerate's sequential shards, which gathering puts back in order.
        if eval_dataset is None:
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


def main(argv: list[str] | None = None) -> dict:
    start = time.perf_counter()
    model_args, data_args, adapter_args, training_args = parse_args(argv)
    check_args(data_args, adapter_args, training_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not training_args.should_log:
        logger.setLevel(logging.WARNING)
    set_seed(training_args.seed)
    task = get_task(data_args.task)

    # Data: train (optionally a seeded subset, optionally minus a held-out part) and the dev split(s).
    raw = load_glue(task, data_args.data_dir)
    train = take_subset(raw["train"], data_args.max_train_samples, data_args.train_subset_seed)
    if data_args.holdout_fraction > 0:
        split = train.train_test_split(test_size=data_args.holdout_fraction, seed=data_args.train_subset_seed)
        held_out = split["test"]
        if data_args.holdout_disjoint:
            held_out = without_shared_phrases(held_out, split["train"])
        train, evals = split["train"], {"train_holdout": held_out}
    elif data_args.holdout_rows is not None:
        rest = take_rest(raw["train"], data_args.max_train_samples, data_args.train_subset_seed)
        disjoint = train if data_args.holdout_disjoint else None
        whole = raw["train"] if data_args.holdout_whole_sentences else None
        held_out = held_out_rows(rest, data_args.holdout_rows, data_args.holdout_min_words, disjoint, whole)
        evals = {"train_holdout": held_out}
    else:
        evals = {name: raw[name] for name in task.eval_splits}
    if data_args.max_eval_samples is not None:
        evals = {name: ds.select(range(min(data_args.max_eval_samples, len(ds)))) for name, ds in evals.items()}
    logger.info("%s: %d train rows, dev %s", task.name, len(train), {k: len(v) for k, v in evals.items()})

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = (batch["sentence1"], batch["sentence2"]) if task.is_pair else (batch["sentence1"],)
        return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

    text_columns = ["sentence1", "sentence2"] if task.is_pair else ["sentence1"]
    with training_args.main_process_first(desc="tokenization"):
        train = train.map(tokenize, batched=True, remove_columns=text_columns, desc="Tokenizing train")
        evals = {
            name: ds.map(tokenize, batched=True, remove_columns=text_columns, desc=f"Tokenizing {name}")
            for name, ds in evals.items()
        }

    # Model: the pretrained encoder, a new head (one output for STS-B: MSE loss), then the adapter.
    labels = {} if task.is_regression else {
        "id2label": dict(enumerate(task.label_names)), "label2id": {n: i for i, n in enumerate(task.label_names)}
    }  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        **labels,
    )
    if task.is_regression:
        start_regression_at_mean(model, float(sum(train["label"]) / len(train)))
    total_steps = total_training_steps(len(train), training_args)
    peft_config, callbacks = build_adapter(adapter_args, model.config.model_type, total_steps)
    model = get_peft_model(model, peft_config)
    param_budget = set_tucker_budget(model, adapter_args) if adapter_args.method == "tucker" else None

    def metrics_fn(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return compute_metrics(task.name, predictions_from_logits(task.name, logits), prediction.label_ids)

    trainer = GlueTrainer(
        core_lr_ratio=adapter_args.core_lr_ratio if adapter_args.method == "tucker" else 1.0,
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=metrics_fn,
        callbacks=callbacks,
    )
    if not training_args.disable_tqdm:  # the same bar, printed after the callbacks above have filled the logs
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(CompactProgressCallback)
    train_start = time.perf_counter()
    train_result = trainer.train()
    train_time = time.perf_counter() - train_start
    if adapter_args.method == "adalora" and trainer.state.global_step != total_steps:
        logger.warning("AdaLoRA's total_step was %d but training took %d", total_steps, trainer.state.global_step)

    results, row_predictions = {}, {}
    for name, ds in evals.items():
        output = trainer.predict(ds, metric_key_prefix=name)
        trainer.log(output.metrics)  # what `trainer.evaluate` logs, so trainer_state.json keeps the scores
        results[name] = {metric: output.metrics[f"{name}_{metric}"] for metric in task.metrics}
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        # per row, so that two methods can be compared on the same rows (benchmarks/paired_rows.py)
        row_predictions[name], auc = row_record(task.name, logits, output.label_ids)
        if auc is not None:  # threshold-free, beside the task's own metrics
            results[name]["roc_auc"] = auc
    main_split = next(iter(evals))

    counts = parameter_counts(model, adapter_args.method)
    reference = lora_parameters(model, adapter_args.reference_lora_r)
    head = head_parameters(model)
    fingerprints = gather_across_processes(adapter_fingerprint(model))
    ranks = final_ranks(model, adapter_args.method, adapter_args.rank)
    ranks_per_process = gather_across_processes(ranks)
    spread = max(fingerprints) - min(fingerprints)
    agree = all(r == ranks for r in ranks_per_process) and spread <= 1e-6 * max(1.0, abs(fingerprints[0]))
    if not agree:
        raise RuntimeError(f"processes disagree on the trained adapter: fingerprints {fingerprints}")

    report = {
        "task": task.name,
        "method": adapter_args.method,
        "model_name_or_path": model_args.model_name_or_path,
        "seed": training_args.seed,
        "num_train_samples": len(train),
        "num_eval_samples": {name: len(ds) for name, ds in evals.items()},
        "eval_on": main_split,
        "metrics": results,
        "main_metric": {"name": task.main_metric, "split": main_split, "value": results[main_split][task.main_metric]},
        # the score of always predicting the most frequent training label, on the same rows
        "majority_baseline": {n: majority_baseline(task.name, train["label"], ds["label"]) for n, ds in evals.items()},
        "train_loss": train_result.training_loss,
        "optimizer_steps": trainer.state.global_step,
        "trainable_parameters": counts["trainable"],
        "active_trainable_parameters": counts["active"],
        f"lora_r{adapter_args.reference_lora_r}_parameters": reference,
        "active_fraction_of_lora": counts["active"] / reference,
        # the budget covers the adapter only: compare it with the adapter-only counts
        "param_budget": param_budget,
        "head_parameters": head,
        f"lora_r{adapter_args.reference_lora_r}_adapter_parameters": reference - head,
        "active_adapter_parameters": counts["active"] - head,
        "parameter_counting": PARAMETER_COUNTING[adapter_args.method],
        "final_ranks": ranks,
        "train_time_s": train_time,
        "wall_time_s": None,
        "world_size": training_args.world_size,
        "processes": {"fingerprints": fingerprints, "agree": agree},
        "versions": versions(),
        "args": {
            "model": asdict(model_args), "data": asdict(data_args), "adapter": asdict(adapter_args),
            "training": {k: v for k, v in training_args.to_dict().items() if not k.startswith("_")},
        },
    }  # fmt: skip

    if trainer.is_world_process_zero():
        out = training_args.output_dir
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(os.path.join(out, "adapter"))
        trainer.state.save_to_json(os.path.join(out, "trainer_state.json"))
        plot = None
        if adapter_args.method == "tucker":
            import tucker_lora

            plot = tucker_lora.plot_ranks(trainer.state.log_history, os.path.join(out, "ranks.png"))
        elif adapter_args.method == "adalora":
            plot = plot_adalora_budget(callbacks[0].history, os.path.join(out, "ranks.png"))
        report["rank_plot"] = None if plot is None else str(plot)
        report["wall_time_s"] = time.perf_counter() - start
        write_json_atomically(os.path.join(out, "predictions.json"), row_predictions, indent=None)
        write_json_atomically(os.path.join(out, "metrics.json"), report)
        main_value = report["main_metric"]["value"]
        budget_line = ""
        if param_budget is not None:
            used = report["active_adapter_parameters"]
            budget_line = f"param_budget: {param_budget:,} adapter parameters (head not counted), used {used:,}\n"
        print(
            f"\n{task.name} {main_split} {task.main_metric}: {main_value:.4f}   (all: {results})\n"
            f"active trainable parameters: {counts['active']:,} ({adapter_args.method}) vs "
            f"{reference:,} for LoRA r={adapter_args.reference_lora_r} on the same model "
            f"({100 * counts['active'] / reference:.1f}%)\n"
            f"{budget_line}"
            f"rank plot: {report['rank_plot'] or 'none (fixed ranks)'}\n"
            f"metrics: {os.path.join(out, 'metrics.json')}   wall time: {report['wall_time_s']:.0f} s"
        )
    return report


if __name__ == "__main__":
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    main()
