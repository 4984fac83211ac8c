"""Fixtures for the GLUE recipe tests, written under pytest's temporary folders; nothing touches the network."""

from __future__ import annotations

from pathlib import Path

import pytest
from glue_fixtures import make_glue_dir, make_tiny_bert, make_tiny_deberta


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in the GLUE download's layout with 32 train and 12 dev rows per task (MNLI: two dev files)."""
    return make_glue_dir(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized 2-layer BERT (hidden 32) and a word-level tokenizer, saved like a hub checkpoint."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_deberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized 2-layer DeBERTa-v2 (DeBERTaV3's attention settings) with the word-level tokenizer."""
    return make_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta"))
