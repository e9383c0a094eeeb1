import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two xdist workers on two cores, and most tests start ranks of one thread each (torchrun's default,
# which helpers.run_ranks keeps): the tests' own processes and the plain `python -m` runs they start
# keep to one thread too, so that no OpenMP pool spins on a core another process needs (set before
# torch is imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The token cache's default folder (data.cache_dir=null) is under XDG_CACHE_HOME: the suite's runs
# and their subprocesses write theirs in a folder of their own, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sample-aware-trainer-tests-")

from helpers import DEMO_MODEL, addition_rows, make_tiny_model, make_tiny_qwen2, rl_rows, write_parquet  # noqa: E402


@pytest.fixture()
def tok():
    """The demo model's tokenizer (a fresh one per test: tests may add tokens or a template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group; in-process trainer tests run before may have left theirs (the
    trainers reuse an existing group, as this does)."""
    import torch.distributed as dist

    if dist.is_initialized():
        assert dist.get_world_size() == 1
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A tiny Qwen2 with a byte-level BPE tokenizer (the demo model's tokenizer is word-level)."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "model")


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
