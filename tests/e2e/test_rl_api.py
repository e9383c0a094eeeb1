"""The sample-logging document's Python example, with a local model and data."""

import json

import torch

from config.rl_schema import DEFAULT_SAMPLE_PROMPTS
from helpers import read_metrics
from trainer.api import create_rl_trainer


def test_documented_python_example_runs_to_completion(tiny_model, rl_data, tmp_path, capsys):
    trainer = create_rl_trainer(
        model_name=str(tiny_model),
        dataset_name=str(rl_data["dir"]),
        algorithm="ppo",
        backend="fsdp",
        num_epochs=1,
        batch_size=1,
        sample_logging={
            "enabled": True,
            "percent_of_max_steps": 0.5,
            "num_samples": 2,
            "max_new_tokens": 72,
            "temperature": 0.8,
        },
        **{"trainer.default_local_dir": str(tmp_path / "run"), "rollout.max_new_tokens": 4, "data.max_val_prompts": 2},
    )
    trainer.train()
    out = capsys.readouterr().out
    assert "Qualitative samples (50%) - prompts: 2" in out and "Qualitative samples (post-train) - prompts: 2" in out
    assert f"[Sample 1/2] Prompt: {DEFAULT_SAMPLE_PROMPTS[0]}" in out
    records = [json.loads(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    events = sorted({(r["step"], r["stage"]) for r in records if r["kind"] == "sample"})
    assert events == [(16, "50%"), (32, "post-train")]  # 32 prompts, one per step
    assert all(r["settings"]["max_new_tokens"] == 72 and r["settings"]["temperature"] == 0.8 for r in records if r["kind"] == "sample")
    assert (tmp_path / "run" / "global_step_32").is_dir()


def test_callables_as_reward_functions_are_named_and_scored(tiny_model, rl_data, tmp_path, capsys):
    def short(prompt, response, ground_truth):
        return -len(response) / 10

    def always(prompt, response, ground_truth):
        return 0.81

    run = create_rl_trainer(
        model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), algorithm="grpo", batch_size=4,
        reward_functions=[short, always],
        sample_logging={"enabled": True, "prompts": ["1+1="], "max_new_tokens": 3},
        **{"trainer.default_local_dir": str(tmp_path / "run"), "trainer.total_training_steps": 2, "rollout.max_new_tokens": 3,
           "rollout.responses_per_prompt": 2, "data.max_val_prompts": 2,
           "logging.loggers": ["file"]},  # no console tracker: the sample blocks still reach stdout
    )
    run.train()
    out = capsys.readouterr().out
    assert "[Sample 1/1] Rewards: {'reward_0': " in out and "'reward_1': 0.81}" in out
    assert "step 1: " not in out  # metric lines are the console tracker's, which is off


def test_ppo_critic_has_no_dropout_and_checkpoints_activations_when_asked(tiny_model, rl_data, tmp_path):
    """verl's critic: no dropout (training-mode values equal the eval-mode ones they are clipped
    against), and activation checkpointing when asked (`critic.enable_gradient_checkpointing`;
    null: as the actor)."""
    run = create_rl_trainer(
        model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), algorithm="ppo", num_epochs=1, batch_size=16,
        **{"trainer.default_local_dir": str(tmp_path / "run"), "rollout.max_new_tokens": 3, "data.max_val_prompts": 2,
           "model.enable_gradient_checkpointing": False, "critic.enable_gradient_checkpointing": True, "trainer.save_freq": -1},
    )
    trainer = run.train()

    def checkpointing(model) -> bool:
        return bool(getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing)

    # verl's critic.model.enable_gradient_checkpointing, apart from the actor's.
    assert checkpointing(trainer.critic) and not checkpointing(trainer.actor)
    assert all(m.p == 0 for m in trainer.critic.modules() if isinstance(m, torch.nn.Dropout))
    assert trainer.critic.config.classifier_dropout == 0.0
    # Checkpointed or not, the critic learns: its loss was computed and logged at both steps.
    metrics = read_metrics(tmp_path / "run")
    assert sorted(s for s, m in metrics.items() if "critic/vf_loss" in m) == [1, 2], metrics


def test_bf16_master_weights_for_the_actor_and_its_reference_the_critic_keeps_fp32(tiny_model, rl_data, tmp_path):
    """verl's `+actor_rollout_ref.actor.fsdp_config.model_dtype=bf16` (its gpt-oss script): the
    actor's weights and AdamW state in bf16, the frozen reference stored alike (it equals the
    actor's start), the critic on fp32 masters (verl's critic has its own model_dtype, fp32)."""
    run = create_rl_trainer(
        model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), algorithm="ppo", num_epochs=1, batch_size=16,
        **{"trainer.default_local_dir": str(tmp_path / "run"), "rollout.max_new_tokens": 3, "data.max_val_prompts": 2,
           "model.fsdp_config.model_dtype": "bf16", "algorithm.kl_coef": 0.1, "trainer.save_freq": -1},
    )
    trainer = run.train()

    def dtypes(model) -> set:  # the sharded weights (`parameters()` may show a root left gathered in the compute dtype)
        return {t.dtype for t in model.state_dict().values() if t.is_floating_point()}

    assert dtypes(trainer.actor) == dtypes(trainer.reference) == {torch.bfloat16}
    assert dtypes(trainer.critic) == {torch.float32}
    moments = [m for s in trainer.optimizer.state.values() for m in (s["exp_avg"], s["exp_avg_sq"])]
    assert moments and {m.dtype for m in moments} == {torch.bfloat16}
    metrics = read_metrics(tmp_path / "run")
    for key in ("actor/pg_loss", "actor/kl_loss", "critic/vf_loss"):
        assert [s for s, m in metrics.items() if key in m] == [1, 2], key


def test_rl_samples_from_a_prompts_file_with_k_answers_are_scored_by_task_metrics(tiny_model, rl_data, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1=", "reference": "2", "id": "one-plus-one", "tags": ["math"]}) + "\n")
    run = create_rl_trainer(
        model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), algorithm="grpo", batch_size=2,
        sample_logging={"enabled": True, "max_new_tokens": 3, "num_samples_per_prompt": 2, "also_greedy": True},
        **{"trainer.default_local_dir": str(tmp_path / "run"), "trainer.total_training_steps": 1, "rollout.max_new_tokens": 3,
           "rollout.responses_per_prompt": 2, "data.max_val_prompts": 1, "logging.loggers": ["file"],
           "samples.prompts_file": str(prompts), "samples.metrics": [{"fn": "length_chars"}, {"fn": "contains"}]},
    )
    run.train()
    post = read_metrics(tmp_path / "run")[1]
    assert 0 <= post["samples/metric/length_chars/mean@2"] and "samples/metric/length_chars/greedy" in post
    assert post["samples/metric/contains/pass@2"] >= post["samples/metric/contains/mean@2"]
    assert "samples/tag/math/metric/contains" in post
    rows = [json.loads(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "sample"]
    assert [r["prompt_id"] for r in rows] == ["one-plus-one", "one-plus-one#1", "one-plus-one#greedy"]
    assert all(r["reference"] == "2" and "last_number_match" in r["rewards"] for r in rows)  # scored against it
