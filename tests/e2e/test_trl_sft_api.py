"""Acceptance of the TRL user's way in: a TRL-style script (`Dataset.from_list` ->
`create_sft_trainer(...).train()`) trains the demo model and writes the report; its validation
set is a `save_to_disk` folder; a second run with other data in the same run directory stops in
one line instead of resuming the first."""

import json
import os
import subprocess
import sys

from helpers import DEMO_MODEL, ROOT, addition_rows, read_metrics

SCRIPT = """
import sys
from datasets import Dataset
from config.schema import ConfigError
from trainer.api import create_sft_trainer

out, cache, val_dir = sys.argv[1:4]
rows = [{"prompt": r["prompt"], "completion": r["response"]} for r in json.loads(open(sys.argv[4]).read())]
run = create_sft_trainer(
    model=MODEL,
    train_dataset=Dataset.from_list(rows),
    eval_dataset=val_dir,                       # a folder written by Dataset.save_to_disk
    max_length=32, learning_rate=1e-3, max_steps=4, per_device_train_batch_size=16,
    report_to="none", output_dir=out,
    **{"data.cache_dir": cache, "trainer.max_val_samples": 2, "model.enable_gradient_checkpointing": False},
)
run.train()
try:  # other data, same run directory: resume is automatic, so this must not continue the run above
    create_sft_trainer(model=MODEL, train_dataset=Dataset.from_list(rows[:32]), output_dir=out,
                       **{"data.cache_dir": cache}).train()
except ConfigError as err:
    print("REFUSED:", err)
"""


def test_trl_style_script_trains_the_demo_model_and_writes_the_report(tmp_path):
    import datasets

    rows = addition_rows(96, seed=3)
    datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]} for r in addition_rows(8, seed=4)]) \
        .save_to_disk(str(tmp_path / "val"))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = tmp_path / "train_trl_style.py"
    script.write_text("import json\nMODEL = " + repr(str(DEMO_MODEL)) + "\n" + SCRIPT)
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script), str(out), str(cache), str(tmp_path / "val"), str(tmp_path / "rows.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    metrics = read_metrics(out)
    assert sorted(s for s in metrics if "train/loss" in metrics[s]) == [1, 2, 3, 4]
    assert metrics[4]["train/loss"] < metrics[1]["train/loss"]  # it learns
    assert "val/loss" in metrics[4]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sum(1 for r in samples if r.get("kind") == "sample" and r["step"] == 4) == 2
    assert (out / "report.html").is_file() and (out / "hf_model" / "config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["data"]["prompt_key"], config["data"]["response_key"]) == ("prompt", "completion")  # TRL's format, recognised
    files = config["data"]["train_files"] + config["data"]["val_files"]
    assert len(files) == 2 and all(f.startswith(str(cache / "datasets")) and f.endswith(".parquet") for f in files)
    refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED:")]
    assert len(refused) == 1 and refused[0].startswith(f"REFUSED: data.train_files changed since the checkpoint {out / 'global_step_4'}")
    assert "trainer.resume_force=true" in refused[0]
