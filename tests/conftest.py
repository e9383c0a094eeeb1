import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import addition_rows, make_tiny_model, rl_rows, write_parquet  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_data")
    return {
        "train": write_parquet(addition_rows(64, seed=1), root / "train.parquet"),
        "val": write_parquet(addition_rows(12, seed=2), root / "val.parquet"),
    }


@pytest.fixture(scope="session")
def rl_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rl_data")
    return {
        "dir": root,
        "train": write_parquet(rl_rows(32, seed=3), root / "rl_train.parquet"),
        "val": write_parquet(rl_rows(6, seed=4), root / "rl_val.parquet"),
    }
