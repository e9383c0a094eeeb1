"""The SFT entry point with sample alerts injected (test code; launched by torchrun from
tests/distributed/test_alert_actions_ranks.py). Environment variables, read here only:

    ALERT_INJECT=RULE@N[,RULE@N...]   rank 0's N-th sample event in this process (1-based) raises
                                      an alert of RULE on its first prompt, whatever the model says
    ALERT_CRASH_AFTER_ROLLBACK=1      every rank ends its process (exit 9, no clean-up) right after
                                      a rollback has restored and re-saved its checkpoint: a kill
    ALERT_TRAINER=rl                  the RL trainer (python -m trainer.rl_trainer) instead of SFT
    ALERT_SLOW_EXIT=SECONDS           rank 0's last exit hook sleeps that long: the other rank has
                                      exited first, as when rank 0's trackers take longer to end
"""

import atexit
import os
import sys
import time

import torch.distributed as dist

import trainer.fsdp_sft_trainer as sft
import trainer.history as history
import trainer.rl_trainer as rl
import trainer.run as run


def install() -> None:
    wanted = {}
    for item in filter(None, os.environ.get("ALERT_INJECT", "").split(",")):
        rule, n = item.split("@")
        wanted[int(n)] = rule
    original_check = history.SampleHistory._check
    events = [0]

    def check(self, event, series):
        alerts = original_check(self, event, series)
        events[0] += 1
        if events[0] in wanted:
            alerts.append(history.Alert(wanted[events[0]], f"injected at event {events[0]}", event.samples[0].prompt_id))
        return alerts

    history.SampleHistory._check = check

    if os.environ.get("ALERT_CRASH_AFTER_ROLLBACK"):
        original_roll_back = run.Run._roll_back

        def roll_back(self, *args):
            original_roll_back(self, *args)
            dist.barrier()
            os._exit(9)

        run.Run._roll_back = roll_back

    if os.environ.get("ALERT_SLOW_EXIT") and os.environ.get("RANK") == "0":
        atexit.register(time.sleep, float(os.environ["ALERT_SLOW_EXIT"]))


if __name__ == "__main__":
    install()
    entry = rl if os.environ.get("ALERT_TRAINER") == "rl" else sft
    sys.argv[0] = entry.__name__
    entry.main()
