"""The AlignTune sample-logging document's Python example as written (`algorithm="ppo"`,
`backend="unsloth"`, hh-rlhf), with a local model, a local file in hh-rlhf's layout and a local
reward model in place of the hub names: it runs to the end, on the FSDP2 workers, and prints its
samples with the reward model's score in the document's format."""

import json
import re

from helpers import make_tiny_reward_model, read_metrics, write_jsonl
from trainer.api import create_rl_trainer

HH_ROWS = [
    {"chosen": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers.",
     "rejected": "\n\nHuman: What is a good name for a cat?\n\nAssistant: I won't say."},
    {"chosen": "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Fine, thanks.",
     "rejected": "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Go away."},
    {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.", "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No."},
    {"chosen": "\n\nHuman: Say thanks.\n\nAssistant: Thanks!", "rejected": "\n\nHuman: Say thanks.\n\nAssistant: Why?"},
]


def test_seed_ppo_example_with_preference_data_and_a_reward_model(tiny_model, tmp_path, capsys):
    data = write_jsonl(HH_ROWS, tmp_path / "hh-rlhf" / "train.jsonl")
    rm = make_tiny_reward_model(tmp_path / "rm")
    trainer = create_rl_trainer(
        model_name=str(tiny_model),  # the document: "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"
        dataset_name=str(data),  # the document: "Anthropic/hh-rlhf"
        algorithm="ppo",
        backend="unsloth",
        num_epochs=1,
        batch_size=1,
        sample_logging={
            "enabled": True,
            "percent_of_max_steps": 0.5,
            "num_samples": 2,
            "max_new_tokens": 72,
            "temperature": 0.8,
        },
        # hh-rlhf has no ground truth: a reward model scores the responses. Sizes for a tiny model.
        **{"reward.model.enable": True, "reward.model.path": str(rm), "trainer.default_local_dir": str(tmp_path / "run"),
           "rollout.max_new_tokens": 4, "logging.loggers": ["file"]},
    )
    trainer.train()
    captured = capsys.readouterr()
    out = captured.out
    # The run's log (stderr) says in one line where the document's backend name runs.
    assert "trainer.api: backend='unsloth' runs on this project's FSDP2 workers" in captured.err
    # The document's block: prompt, response and rewards per sample, at 50% and after training.
    for stage in ("50%", "post-train"):
        assert f"Qualitative samples ({stage}) - prompts: 2" in out
    rewards = re.findall(r"\[Sample (\d)/2\] Rewards: \{'reward_model': (-?[\d.]+(?:e-?\d+)?)\}", out)
    assert [i for i, _ in rewards] == ["1", "2", "1", "2"], out
    # The training reward is the reward model's score (the default function has no ground truth here).
    metrics = read_metrics(tmp_path / "run")
    steps = sorted(s for s, m in metrics.items() if "train/reward/reward_model" in m)
    assert steps == [1, 2, 3, 4]
    assert all(metrics[s]["train/reward_mean"] == metrics[s]["train/reward/reward_model"] for s in steps)
    assert "train/reward/last_number_match" not in metrics[1]
    records = [json.loads(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert sorted({(r["step"], r["stage"]) for r in records if r["kind"] == "sample"}) == [(2, "50%"), (4, "post-train")]
