"""Alert actions and metric watches decided on rank 0 (trainer/actions.py), and their keys."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module

from config.loading import resolve
from config.schema import AlertConfig, ConfigError, KeepBestConfig, RollbackConfig, SFTConfig, TrainerConfig
from trainer.actions import Control, Watches, decide, raise_unknown_metric, rollback_warning


def load(overrides):
    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose("demo", overrides=list(overrides))
    return resolve(cfg, SFTConfig, overrides, {}, 1).config


@pytest.mark.parametrize("override, key", [
    ("samples.alerts.action=explode", "samples.alerts.action"),
    ("samples.alerts.actions.degeneration=halt", "samples.alerts.actions.degeneration"),
    ("+samples.alerts.actions.degenration=stop", "samples.alerts.actions"),
    ("samples.alerts.rollback.lr_factor=2", "samples.alerts.rollback.lr_factor"),
    ("samples.alerts.rollback.max_rollbacks=-1", "samples.alerts.rollback.max_rollbacks"),
    ("trainer.keep_best.mode=up", "trainer.keep_best.mode"),
    ("trainer.early_stopping.patience=0", "trainer.early_stopping.patience"),
    ("trainer.stop_at.mode=above", "trainer.stop_at.mode"),
])
def test_bad_action_and_watch_keys_are_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load([override])
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_per_rule_actions_from_the_command_line():
    alerts = load(["samples.alerts.actions.collapse=stop"]).samples.alerts
    assert alerts.action_for("collapse") == "stop" and alerts.action_for("drift") == "warn"


def test_the_drop_rule_of_any_metric_is_set_from_the_command_line_without_a_plus(tmp_path):
    # samples.alerts.actions.<metric>_drop for a metric the YAML does not list: Hydra alone says
    # "Key 'last_number_match_drop' is not in struct"; the CLI adds it (`++`, which also sets a key
    # a user's YAML already has).
    from trainer.cli import appends_as_overrides

    given = ["samples.alerts.actions.last_number_match_drop=stop", "samples.alerts.actions.exact_match_drop=rollback"]
    args = appends_as_overrides(given)
    assert args == ["++samples.alerts.actions.last_number_match_drop=stop", "samples.alerts.actions.exact_match_drop=rollback"]
    alerts = load(args).samples.alerts
    assert (alerts.action_for("last_number_match_drop"), alerts.action_for("exact_match_drop")) == ("stop", "rollback")
    (tmp_path / "mine.yaml").write_text("defaults: [demo, _self_]\nsamples:\n  alerts:\n    actions:\n"
                                        "      last_number_match_drop: warn\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("mine", overrides=args[:1])
    assert resolve(cfg, SFTConfig, args[:1], {}, 1).config.samples.alerts.action_for("last_number_match_drop") == "stop"


def test_rollback_without_checkpoints_is_said_at_start_up():
    alerts = AlertConfig(actions={"collapse": "rollback"})
    line = rollback_warning(alerts, TrainerConfig(save_freq=-1))
    assert line.startswith("samples.alerts.actions.collapse=rollback with trainer.save_freq=-1") and "stops" in line
    assert rollback_warning(alerts, TrainerConfig(save_freq=10)) is None
    assert rollback_warning(AlertConfig(), TrainerConfig(save_freq=-1)) is None


CKPTS = [(2, Path("global_step_2")), (4, Path("global_step_4")), (6, Path("global_step_6"))]


def test_rollback_goes_to_the_newest_checkpoint_before_the_first_alert_of_the_streak():
    cfg, control = AlertConfig(actions={"collapse": "rollback"}), Control()
    warned = decide([("drift", None, "answers moved")], "val", 4, cfg, control, CKPTS)
    assert warned.action == "warn" and control.streak_start == {"val": 4}
    # The checkpoint of step 4 holds the weights that alerted at step 4: the target is step 2.
    d = decide([("drift", None, "m"), ("collapse", None, "same text")], "val", 6, cfg, control, CKPTS)
    assert (d.action, d.rule, d.target, d.first_alert_step) == ("rollback", "collapse", "global_step_2", 4)
    assert decide([], "val", 8, cfg, control, CKPTS).action == "warn" and control.streak_start == {}


def test_rollback_becomes_stop_after_max_rollbacks_or_without_a_checkpoint():
    cfg = AlertConfig(action="rollback", rollback=RollbackConfig(max_rollbacks=1))
    d = decide([("degeneration", "1+1=", "loops")], "val", 6, cfg, Control(rollbacks=1), CKPTS)
    assert d.action == "stop" and "max_rollbacks=1 reached" in d.message and d.prompt == "1+1="
    d = decide([("degeneration", None, "loops")], "val", 2, cfg, Control(), CKPTS)
    assert d.action == "stop" and "no checkpoint before step 2" in d.message
    stop = AlertConfig(actions={"collapse": "stop"})
    d = decide([("drift", None, "a"), ("collapse", "p", "b")], "val", 6, stop, Control(), CKPTS)
    assert (d.action, d.rule) == ("stop", "collapse") and "[collapse] at step 6 (prompt 'p')" in d.reason()


def test_an_unknown_watched_key_names_itself_and_the_keys_that_exist():
    w = Watches(TrainerConfig(keep_best=KeepBestConfig("val/exact_match_typo", "max")))
    outcome = w.observe(2, {"val/loss": 1.0, "val/exact_match": 0.5}, Control())
    with pytest.raises(ConfigError, match=r"^trainer.keep_best.metric='val/exact_match_typo' .* val/exact_match, val/loss$"):
        raise_unknown_metric(outcome)
    # An event of another kind (RL qualitative samples) without it is no error.
    assert w.observe(3, {"samples/alerts": 0.0}, Control()).error is None


def test_keep_best_early_stopping_and_stop_at():
    cfg = TrainerConfig()
    cfg.keep_best.metric, cfg.keep_best.mode = "val/loss", "min"
    cfg.early_stopping.metric, cfg.early_stopping.mode = "val/loss", "min"
    cfg.early_stopping.patience, cfg.early_stopping.min_delta = 2, 0.1
    cfg.stop_at.metric, cfg.stop_at.mode, cfg.stop_at.value = "val/acc", "max", 0.9
    w, c = Watches(cfg), Control()
    seen = [w.observe(step, {"val/loss": loss, "val/acc": acc}, c)
            for step, loss, acc in [(1, 2.0, 0.1), (2, 1.5, 0.2), (3, 1.45, 0.3), (4, 1.42, 0.4)]]
    assert [o.new_best for o in seen] == [True, True, True, True] and c.best_step == 4
    # 1.45 and 1.42 improve on 1.5 by less than min_delta: two stale validations end the run.
    assert [o.stop is not None for o in seen] == [False, False, False, True] and "early stopping at step 4" in seen[-1].stop
    done = Watches(cfg).observe(5, {"val/loss": 3.0, "val/acc": 0.95}, Control())
    assert done.stop.startswith("stop_at reached at step 5: val/acc=0.95")


def test_control_from_an_older_checkpoint():
    assert Control.from_state(None) == Control()
    assert Control.from_state({"rollbacks": 2, "later_field": 1}).rollbacks == 2
