"""Shared fixtures: a tiny random-weight checkpoint (fast on CPU) and the bundled sample study."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from busi_batch.model import ModelCard, MultiTaskUNet, UNetConfig, save_model  # noqa: E402

TESTS = Path(__file__).resolve().parent
SAMPLE_STUDY = TESTS / "data" / "sample_study"
BUSI = TESTS.parent.parent / "shared" / "data" / "busi"


def make_tiny_checkpoint(path: Path, seed: int = 0, input_size: int = 64) -> Path:
    """A width-4, depth-3 network with random weights: exercises every code path in milliseconds."""
    torch.manual_seed(seed)
    config = UNetConfig(base_width=4, depth=3)
    card = ModelCard(
        name="tiny-test", version="0", architecture=dataclasses.asdict(config), input_size=input_size,
        test_model=True, training_data="none: random weights for tests",
    )
    save_model(MultiTaskUNet(config), card, path)
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt")


@pytest.fixture
def sample_study() -> Path:
    assert SAMPLE_STUDY.is_dir(), "bundled sample study missing"
    return SAMPLE_STUDY


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 of every file (and a marker per folder): proves a folder was left untouched.

    ``skip``: relative paths left out (busi-batch's lock file, whose holder line every run rewrites).
    """
    digest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            digest[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = "dir"
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and os.access(full, os.R_OK):
                digest[os.path.relpath(full, root)] = hashlib.sha256(Path(full).read_bytes()).hexdigest()
    for rel in skip:
        digest.pop(rel, None)
    return digest
