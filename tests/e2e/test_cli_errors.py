"""Bad input stops the run with one line naming the culprit, before any model is built."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import run_module, write_parquet


def first_error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


CASES = [
    (["data.max_length=long"], {}, "error: data.max_length: 'long' is the wrong type"),
    (["+trainer.epochs=3"], {}, "error: trainer.epochs: unknown key"),
    ([], {"VERL_GENERATION_TEMPERATURE": "hot"}, "error: VERL_GENERATION_TEMPERATURE='hot' is not valid: expected a number > 0"),
    ([], {"VERL_GENERATION_TOP_P": "1.5"}, "error: VERL_GENERATION_TOP_P='1.5' is not valid: expected a number in (0, 1]"),
    ([], {"VERL_GENERATION_DO_SAMPLE": "maybe"}, "error: VERL_GENERATION_DO_SAMPLE='maybe' is not valid"),
    ([], {"VERL_MAX_VAL_SAMPLES": "-2"}, "error: VERL_MAX_VAL_SAMPLES='-2' is not valid: expected an integer >= 0"),
    (["model.partial_pretrain=/nonexistent/model"], {}, "error: model.partial_pretrain=/nonexistent/model: not found;"),
    (["model.partial_pretrain=nonexistent-org/model"], {}, "error: model.partial_pretrain='nonexistent-org/model': cannot load a tokenizer"),
    (["trainer.logger=[console,nosuch]"], {}, "error: trainer.logger: got 'nosuch'"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's process, three at a time: each spends its seconds importing torch and transformers."""
    root = tmp_path_factory.mktemp("cli_errors")

    def one(index):
        overrides, env, _ = CASES[index]
        args = ["--config-name", "demo", f"trainer.default_local_dir={root}/run{index}", *overrides]
        return run_module("trainer.fsdp_sft_trainer", args, nproc=0, env=env, check=False), root / f"run{index}"

    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(one, range(len(CASES))))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[2].split(":")[1].strip() for c in CASES])
def test_one_line_errors(index, runs):
    proc, run_dir = runs[index]
    assert proc.returncode == 2
    assert first_error_line(proc).startswith(CASES[index][2])
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_bad_row_is_named_before_the_model_is_built(tmp_path):
    bad = write_parquet([{"prompt": "1+1=", "response": "2"}, {"prompt": "2+2=", "response": None}], tmp_path / "bad.parquet")
    proc = run_module("trainer.fsdp_sft_trainer", ["--config-name", "demo", f"data.train_files={bad}",
                                                   f"trainer.default_local_dir={tmp_path}/run"], nproc=0, check=False)
    assert proc.returncode == 2
    assert first_error_line(proc) == f"error: {bad}: row 1: column 'response' is NoneType, expected text"
    assert "trainer.sft: model: " not in proc.stderr  # the model was never loaded


def test_a_run_without_model_or_data_says_how_to_start_the_demo(tmp_path):
    # The seed document's `python -m verl.trainer.fsdp_sft_trainer` with no arguments, where verl's default paths are empty.
    proc = run_module("trainer.fsdp_sft_trainer", [], nproc=0, check=False, cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = first_error_line(proc)
    assert line.startswith(f"error: model.partial_pretrain={tmp_path}/models/gemma-1.1-7b-it and data.train_files={tmp_path}/data/gsm8k/train.parquet: not found")
    assert line.endswith("python -m trainer.fsdp_sft_trainer --config-name demo")
    assert not (tmp_path / "checkpoints").exists()
