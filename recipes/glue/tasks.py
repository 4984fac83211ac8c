"""GLUE task definitions and data loading for the fine-tuning recipe.

Every task is described once in `TASKS`: where its text and label live in the original GLUE TSV download and in the
hub's `nyu-mll/glue` dataset, its label names (in the hub's order, so a label index means the same thing whichever
source the data came from), its dev splits and its metrics.

Both sources are normalized to the same columns: `sentence1`, `sentence2` (pair tasks only) and `label` (an int class
index, or a float score for STS-B).

```python
>>> from tasks import TASKS, load_glue
>>> splits = load_glue("rte", data_dir="../shared/data/glue")
>>> splits["train"][0]["label"], TASKS["rte"].label_names
(1, ('entailment', 'not_entailment'))
```
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is read, labelled and scored.

    Args:
        name (`str`): the task's name on the command line and in the hub dataset (`"sst2"`).
        folder (`str`): the task's folder in the original GLUE download (`"SST-2"`).
        text_columns (`tuple`): TSV columns of the first and, for pair tasks, second text: header names, or
            integer indices for files without a header (CoLA).
        label_column (`str | int`): TSV column of the label (name or index).
        has_header (`bool`): whether the TSV files start with a header row.
        hub_text_columns (`tuple`): the same texts' columns in the hub dataset.
        label_names (`tuple[str, ...] | None`): class names in index order (the hub's order); `None` for regression.
        tsv_labels (`tuple[str, ...] | None`): the raw TSV value of each class, in index order.
        eval_splits (`dict[str, tuple[str, str]]`): dev split name -> (TSV file stem, hub split name).
        metrics (`tuple[str, ...]`): metrics reported on every dev split (see `metrics.py`).
        main_metric (`str`): the metric a single number per run is taken from (first dev split).
    """

    name: str
    folder: str
    text_columns: tuple[str | int, ...]
    label_column: str | int
    has_header: bool
    hub_text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    tsv_labels: tuple[str, ...] | None
    eval_splits: dict[str, tuple[str, str]]
    metrics: tuple[str, ...]
    main_metric: str

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


_DEV = {"validation": ("dev", "validation")}
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            name="cola", folder="CoLA", text_columns=(3,), label_column=1, has_header=False,
            hub_text_columns=("sentence",), label_names=("unacceptable", "acceptable"), tsv_labels=_BINARY,
            eval_splits=_DEV, metrics=("matthews_correlation", "accuracy"), main_metric="matthews_correlation",
        ),
        GlueTask(
            name="sst2", folder="SST-2", text_columns=("sentence",), label_column="label", has_header=True,
            hub_text_columns=("sentence",), label_names=("negative", "positive"), tsv_labels=_BINARY,
            eval_splits=_DEV, metrics=("accuracy",), main_metric="accuracy",
        ),
        GlueTask(
            name="mrpc", folder="MRPC", text_columns=("#1 String", "#2 String"), label_column="Quality",
            has_header=True, hub_text_columns=("sentence1", "sentence2"),
            label_names=("not_equivalent", "equivalent"), tsv_labels=_BINARY,
            eval_splits=_DEV, metrics=("accuracy", "f1"), main_metric="accuracy",
        ),
        GlueTask(
            name="qqp", folder="QQP", text_columns=("question1", "question2"), label_column="is_duplicate",
            has_header=True, hub_text_columns=("question1", "question2"),
            label_names=("not_duplicate", "duplicate"), tsv_labels=_BINARY,
            eval_splits=_DEV, metrics=("accuracy", "f1"), main_metric="accuracy",
        ),
        GlueTask(
            name="stsb", folder="STS-B", text_columns=("sentence1", "sentence2"), label_column="score",
            has_header=True, hub_text_columns=("sentence1", "sentence2"), label_names=None, tsv_labels=None,
            eval_splits=_DEV, metrics=("pearson", "spearman"), main_metric="pearson",
        ),
        GlueTask(
            name="mnli", folder="MNLI", text_columns=("sentence1", "sentence2"), label_column="gold_label",
            has_header=True, hub_text_columns=("premise", "hypothesis"),
            label_names=("entailment", "neutral", "contradiction"),
            tsv_labels=("entailment", "neutral", "contradiction"),
            eval_splits={
                "validation_matched": ("dev_matched", "validation_matched"),
                "validation_mismatched": ("dev_mismatched", "validation_mismatched"),
            },
            metrics=("accuracy",), main_metric="accuracy",
        ),
        GlueTask(
            name="qnli", folder="QNLI", text_columns=("question", "sentence"), label_column="label",
            has_header=True, hub_text_columns=("question", "sentence"), label_names=_NLI2, tsv_labels=_NLI2,
            eval_splits=_DEV, metrics=("accuracy",), main_metric="accuracy",
        ),
        GlueTask(
            name="rte", folder="RTE", text_columns=("sentence1", "sentence2"), label_column="label",
            has_header=True, hub_text_columns=("sentence1", "sentence2"), label_names=_NLI2, tsv_labels=_NLI2,
            eval_splits=_DEV, metrics=("accuracy",), main_metric="accuracy",
        ),
    )
}  # fmt: skip


def get_task(name: str) -> GlueTask:
    """Return the task called `name`, or raise a `ValueError` listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"`--task` must be one of {sorted(TASKS)}; got {name!r}")
    return TASKS[name]


def read_tsv(path: str | os.PathLike) -> list[list[str]]:
    """Read a GLUE TSV file with quoting disabled (GLUE sentences contain bare quote characters)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def parse_rows(task: GlueTask, rows: list[list[str]], source: str = "<rows>") -> dict[str, list]:
    """Turn raw TSV rows of `task` into the columns `sentence1`, `sentence2` (pair tasks) and `label`.

    Rows with too few fields (a handful in some GLUE train files) are skipped with a warning. An unknown label is an
    error: it means the file is not what the task expects.

    Args:
        task (`GlueTask`): the task the rows belong to.
        rows (`list[list[str]]`): the file's rows, header included when `task.has_header`.
        source (`str`): the file name, for messages.

    Returns:
        `dict[str, list]`: equal-length columns ready for `datasets.Dataset.from_dict`.
    """
    if task.has_header:
        if not rows:
            raise ValueError(f"{source} is empty; expected a header row for GLUE task {task.name!r}")
        header, body, first_line = rows[0], rows[1:], 2
        index = {}
        for column in (*task.text_columns, task.label_column):
            if column not in header:
                raise ValueError(f"{source} must have a column {column!r} for GLUE task {task.name!r}; got {header}")
            index[column] = header.index(column)
    else:
        body, first_line = rows, 1
        index = {column: column for column in (*task.text_columns, task.label_column)}
    needed = max(index.values()) + 1
    label_of = None if task.tsv_labels is None else {raw: i for i, raw in enumerate(task.tsv_labels)}

    columns: dict[str, list] = {"sentence1": [], "label": []}
    if task.is_pair:
        columns["sentence2"] = []
    skipped = 0
    for line, row in enumerate(body, start=first_line):
        if len(row) < needed:
            skipped += 1
            continue
        raw = row[index[task.label_column]].strip()
        if label_of is None:
            try:
                label = float(raw)
            except ValueError:
                raise ValueError(f"{source}, line {line}: the label of {task.name!r} must be a number; got {raw!r}")
        elif raw in label_of:
            label = label_of[raw]
        else:
            where, choices = f"{source}, line {line}", list(task.tsv_labels)
            raise ValueError(f"{where}: the label of {task.name!r} must be one of {choices}; got {raw!r}")
        columns["label"].append(label)
        columns["sentence1"].append(row[index[task.text_columns[0]]])
        if task.is_pair:
            columns["sentence2"].append(row[index[task.text_columns[1]]])
    if skipped:
        logger.warning("%s: skipped %d row(s) with fewer than %d fields", source, skipped, needed)
    return columns


def _features(task: GlueTask) -> datasets.Features:
    features = {"sentence1": datasets.Value("string")}
    if task.is_pair:
        features["sentence2"] = datasets.Value("string")
    if task.is_regression:
        features["label"] = datasets.Value("float32")
    else:
        features["label"] = datasets.ClassLabel(names=list(task.label_names))
    return datasets.Features(features)


def load_local(task: GlueTask, data_dir: str | os.PathLike) -> datasets.DatasetDict:
    """Load `task`'s train and dev splits from a folder in the original GLUE download's layout."""
    folder = os.path.join(data_dir, task.folder)
    stems = {"train": "train", **{split: stem for split, (stem, _) in task.eval_splits.items()}}
    splits = {}
    for split, stem in stems.items():
        path = os.path.join(folder, f"{stem}.tsv")
        if not os.path.isfile(path):
            raise ValueError(
                f"`--data_dir` must hold {task.folder}/{stem}.tsv for task {task.name!r}; {path} is missing"
            )
        columns = parse_rows(task, read_tsv(path), source=path)
        splits[split] = datasets.Dataset.from_dict(columns, features=_features(task))
    return datasets.DatasetDict(splits)


def load_hub(task: GlueTask) -> datasets.DatasetDict:
    """Load `task` from the hub's GLUE dataset (needs network access) and normalize its columns."""
    raw = datasets.load_dataset(HUB_DATASET, task.name)
    splits = {}
    for split, hub_split in {"train": "train", **{s: hub for s, (_, hub) in task.eval_splits.items()}}.items():
        ds = raw[hub_split]
        ds = ds.rename_columns(dict(zip(task.hub_text_columns, ("sentence1", "sentence2"))))
        ds = ds.remove_columns([c for c in ds.column_names if c not in _features(task)])
        splits[split] = ds.cast(_features(task))
    return datasets.DatasetDict(splits)


def load_glue(task: str | GlueTask, data_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """Load a GLUE task as a `DatasetDict` with `train` and the task's dev splits.

    Args:
        task (`str | GlueTask`): task name (`"sst2"`) or definition.
        data_dir (`str`, *optional*): folder in the original GLUE layout (`<data_dir>/SST-2/train.tsv`, ...). Without
            it the data come from the hub (`nyu-mll/glue`).
    """
    task = get_task(task) if isinstance(task, str) else task
    if data_dir is None:
        return load_hub(task)
    if not os.path.isdir(data_dir):
        raise ValueError(f"`--data_dir` must be an existing folder; got {str(data_dir)!r}")
    return load_local(task, data_dir)


def take_subset(dataset: datasets.Dataset, num_samples: int | None, seed: int) -> datasets.Dataset:
    """The first `num_samples` rows of a permutation of `dataset` drawn with `seed` (the whole set if `None`)."""
    if num_samples is None or num_samples >= len(dataset):
        return dataset
    if num_samples <= 0:
        raise ValueError(f"`--max_train_samples` must be a positive integer; got {num_samples}")
    return dataset.shuffle(seed=seed).select(range(num_samples))


def take_rest(dataset: datasets.Dataset, num_samples: int, seed: int) -> datasets.Dataset:
    """The rows of `dataset` that `take_subset(dataset, num_samples, seed)` leaves out, in the same permutation."""
    return dataset.shuffle(seed=seed).select(range(min(num_samples, len(dataset)), len(dataset)))


# a held-out row that contains a training row this long (in words) shares a phrase with the training set
SHARED_PHRASE_WORDS = 4


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.lower().split())


def _spans(words: tuple[str, ...], min_words: int, longest: int) -> Iterator[tuple[str, ...]]:
    """Every contiguous span of `words` of at least `min_words` (and 1) and at most `longest` words."""
    shortest = max(min_words, 1)
    return (words[i:j] for i in range(len(words)) for j in range(i + shortest, min(i + longest, len(words)) + 1))


def shares_text_with(rows: list[str], min_words: int = 1) -> Callable[[str], bool]:
    """A test of whether a text contains one of `rows` of at least `SHARED_PHRASE_WORDS` words, or lies inside one of
    `rows` (whole words, case-insensitive). SST-2's train rows are the phrases of parsed sentences: a row outside a
    training subset is often a sub- or super-phrase of a row inside it, so scoring it measures recall of training
    text rather than generalization (dev shares no such text with train). Only texts of at least `min_words` words
    are asked about (spans shorter than that are not kept)."""
    rows_words = [_words(row) for row in rows]
    phrases = {words for words in rows_words if len(words) >= SHARED_PHRASE_WORDS}
    spans: set[tuple[str, ...]] = set()  # every contiguous span of every row
    for words in rows_words:
        spans.update(_spans(words, min_words, len(words)))

    def shares(text: str) -> bool:
        words = _words(text)
        if words in spans:
            return True
        return any(words[i:j] in phrases for i in range(len(words))
                   for j in range(i + SHARED_PHRASE_WORDS, len(words) + 1))  # fmt: skip

    return shares


def without_shared_phrases(
    rows: datasets.Dataset, training_rows: datasets.Dataset, min_words: int = 0
) -> datasets.Dataset:
    """`rows` less those whose first sentence shares a phrase with a first sentence of `training_rows`
    (`shares_text_with`); `min_words`: no row of `rows` is shorter than that (fewer spans to keep)."""
    shares = shares_text_with(training_rows["sentence1"], min_words)
    return rows.filter(lambda row: not shares(row["sentence1"]), desc="Held-out rows sharing no phrase")


def inside_a_longer_row(rows: list[str], min_words: int = 1) -> Callable[[str], bool]:
    """A test of whether a text lies inside a longer row of `rows` (whole words, case-insensitive). SST-2's train
    set holds every phrase of its parsed sentences, so a row that no other row contains is a whole sentence, as
    dev's rows are. Only texts of at least `min_words` words are asked about (shorter spans are not kept)."""
    spans: set[tuple[str, ...]] = set()
    for words in map(_words, rows):
        spans.update(_spans(words, min_words, len(words) - 1))
    return lambda text: _words(text) in spans


def held_out_rows(
    rest: datasets.Dataset,
    num_rows: int,
    min_words: int = 0,
    disjoint_from: datasets.Dataset | None = None,
    whole_sentences_of: datasets.Dataset | None = None,
) -> datasets.Dataset:
    """The first `num_rows` rows of `rest` whose first sentence has at least `min_words` words and, with
    `disjoint_from` (the training rows), shares no phrase with its first sentences (`shares_text_with`); with
    `whole_sentences_of` (the whole train set), lies inside none of its longer rows (`inside_a_longer_row`)."""
    if min_words > 0:
        rest = rest.filter(lambda row: len(row["sentence1"].split()) >= min_words, desc="Held-out rows")
    if disjoint_from is not None:
        rest = without_shared_phrases(rest, disjoint_from, min_words)
    if whole_sentences_of is not None:
        inside = inside_a_longer_row(whole_sentences_of["sentence1"], min_words)
        rest = rest.filter(lambda row: not inside(row["sentence1"]), desc="Held-out whole sentences")
    if len(rest) < num_rows:
        kinds = (" sharing no phrase with it" if disjoint_from is not None else "") + (
            ", whole sentences (inside no longer training row)" if whole_sentences_of is not None else ""
        )
        raise ValueError(
            f"`--holdout_rows` asks for {num_rows} rows outside the training subset with at least {min_words} words "
            f"(`--holdout_min_words`){kinds}; only {len(rest)} exist"
        )
    return rest.select(range(num_rows))
