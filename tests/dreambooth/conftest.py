"""Fixtures for the DreamBooth recipe tests (session-wide, under pytest's temporary folders; no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dreambooth_fixtures import make_image_folder, make_tiny_base


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("instances") / "dog", 3)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dreambooth_fixtures import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dreambooth_fixtures import make_tiny_dino

    return make_tiny_dino(tmp_path_factory.mktemp("tiny-dino"))
