"""Helpers for the GLUE recipe tests: paths, small GLUE-layout TSV files and a tiny BERT saved to disk.

Imported by `conftest.py` (the fixtures) and the test modules; it also puts `recipes/glue` on `sys.path`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO / "recipes" / "glue"
if str(RECIPE_DIR) not in sys.path:
    sys.path.insert(0, str(RECIPE_DIR))

WORDS = (
    "the a film movie is was good bad great awful not very he she said it they man woman dog cat runs ran "
    "company stock rose fell percent billion year on in of and to with by for what how why who question answer "
    "\" ' , . ? !"
).split()


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS[:-6]) for _ in range(n))


def glue_rows(task: str, split: str, n: int, seed: int = 0) -> list[list[str]]:
    """Rows of a GLUE-layout TSV for `task` (header included where the original has one).

    The first row's sentence holds an unbalanced quote character, which only parses right with quoting disabled.
    """
    rng = random.Random(f"{task}-{split}-{seed}")
    s = lambda: _sentence(rng)  # noqa: E731
    quoted = 'he said "good film'
    if task == "CoLA":
        return [["gj04", str(i % 2), "" if i % 2 else "*", quoted if i == 0 else s()] for i in range(n)]
    if task == "SST-2":
        return [["sentence", "label"]] + [[quoted if i == 0 else s(), str(i % 2)] for i in range(n)]
    if task == "MRPC":
        header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
        return [header] + [[str(i % 2), str(100 + i), str(200 + i), quoted if i == 0 else s(), s()] for i in range(n)]
    if task == "QQP":
        header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
        return [header] + [[str(i), str(2 * i), str(2 * i + 1), s() + " ?", s() + " ?", str(i % 2)] for i in range(n)]
    if task == "STS-B":
        header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                  "score"]  # fmt: skip
        return [header] + [
            [
                str(i),
                "main-news",
                "f",
                "2012",
                str(i),
                "none",
                "none",
                quoted if i == 0 else s(),
                s(),
                f"{(i * 0.37) % 5:.3f}",
            ]
            for i in range(n)
        ]
    if task == "MNLI":
        labels = ("entailment", "neutral", "contradiction")
        if split == "train":
            header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                      "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1",
                      "gold_label"]  # fmt: skip
            return [header] + [
                [str(i), "1", "1e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s(), s(), labels[i % 3],
                 labels[i % 3]] for i in range(n)
            ]  # fmt: skip
        header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                  "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "label2", "label3",
                  "label4", "label5", "gold_label"]  # fmt: skip
        return [header] + [
            [str(i), "1", "1e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s(), s()]
            + [labels[i % 3]] * 5 + [labels[i % 3]] for i in range(n)
        ]  # fmt: skip
    if task == "QNLI":
        labels = ("entailment", "not_entailment")
        return [["index", "question", "sentence", "label"]] + [
            [str(i), s() + " ?", s(), labels[i % 2]] for i in range(n)
        ]
    if task == "RTE":
        labels = ("entailment", "not_entailment")
        return [["index", "sentence1", "sentence2", "label"]] + [[str(i), s(), s(), labels[i % 2]] for i in range(n)]
    raise KeyError(task)


GLUE_FOLDERS = ("CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE")


def write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


def make_glue_dir(root: Path) -> Path:
    """Write a folder in the GLUE download's layout: 32 train and 12 dev rows per task (MNLI: two dev files)."""
    for folder in GLUE_FOLDERS:
        write_tsv(root / folder / "train.tsv", glue_rows(folder, "train", 32))
        dev_files = ("dev_matched", "dev_mismatched") if folder == "MNLI" else ("dev",)
        for stem in dev_files:
            write_tsv(root / folder / f"{stem}.tsv", glue_rows(folder, stem, 12))
    return root


def _word_tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def make_tiny_deberta(root: Path) -> Path:
    """Save the tests' tiny DeBERTa-v2 (DeBERTaV3's attention settings, `tests/toy_models.py`) with the word-level
    tokenizer: the recipe's default model type."""
    import torch
    from transformers import DebertaV2Model

    from tests.toy_models import tiny_deberta_config

    tokenizer = _word_tokenizer()
    torch.manual_seed(0)
    DebertaV2Model(tiny_deberta_config(vocab_size=len(tokenizer))).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def make_tiny_bert(root: Path) -> Path:
    """Save a randomly initialized 2-layer BERT (hidden 32) and a word-level tokenizer like a hub checkpoint."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = _word_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
