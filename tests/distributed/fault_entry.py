"""The SFT entry point with faults injected on chosen ranks and steps (after TRL's
tests/distributed/rank_local_forward_failure.py): launched by torchrun from
tests/distributed/test_cluster.py. The faults are chosen with FAULT_* environment variables,
read here only (test code):

    FAULT_NAN_LOSS=RANK:STEP         that rank's loss is NaN in that step (1-based)
    FAULT_FORWARD_ERROR=RANK:STEP    that rank's forward raises in that step
    FAULT_DATA_ERROR=RANK:STEP       that rank's batches of that step raise a DataError (a row
                                     that no longer reads, as when a file changes mid-run)
    FAULT_GATHER_ERROR=RANK:CALL     that rank raises inside its CALL-th gather of the generation copy
    FAULT_HOLD_AT=STEP:MARKER        rank 0 writes MARKER (its agent's pid) before that step and
                                     waits there until it has received SIGTERM
"""

import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

import trainer.fsdp_sft_trainer as sft
import workers.replica as replica
from trainer.data import DataError


def _rank_step(name: str):
    raw = os.environ.get(name)
    return tuple(int(x) for x in raw.split(":")) if raw else (None, None)


def install() -> None:
    nan_rank, nan_step = _rank_step("FAULT_NAN_LOSS")
    err_rank, err_step = _rank_step("FAULT_FORWARD_ERROR")
    hold = os.environ.get("FAULT_HOLD_AT")
    original_step = sft.FSDPSFTTrainer.train_step
    original_loss = sft.token_loss_sum

    def train_step(self, micro_batches):
        step = self.run.step + 1
        if hold and self.dist.rank == 0 and step == int(hold.split(":")[0]):
            Path(hold.split(":", 1)[1]).write_text(str(os.getppid()))
            deadline = time.time() + 300
            while self.run.preemption.signalled is None and time.time() < deadline:
                time.sleep(0.05)

        def loss(model, batch, *feed):
            value = original_loss(model, batch, *feed)
            if self.dist.rank == nan_rank and step == nan_step:
                return value * float("nan")
            if self.dist.rank == err_rank and step == err_step:
                raise RuntimeError(f"injected forward failure on rank {self.dist.rank} at step {step}")
            return value

        sft.token_loss_sum = loss
        try:
            return original_step(self, micro_batches)
        finally:
            sft.token_loss_sum = original_loss

    sft.FSDPSFTTrainer.train_step = train_step

    data_rank, data_step = _rank_step("FAULT_DATA_ERROR")
    if data_rank is not None:
        original_batches = sft.SFTBatches.micro_batches
        seen = [0]

        def micro_batches(self, epoch, index):
            seen[0] += 1
            if self.rank == data_rank and seen[0] == data_step:
                raise DataError(f"injected.jsonl: row {index}: column 'response' is list, expected text")
            return original_batches(self, epoch, index)

        sft.SFTBatches.micro_batches = micro_batches

    gather_rank, gather_call = _rank_step("FAULT_GATHER_ERROR")
    if gather_rank is not None:
        original_gather = replica.gather_full_state_dict_as
        calls = [0]

        def gather(model, dtype):
            calls[0] += 1
            if dist.get_rank() == gather_rank and calls[0] == gather_call:
                raise RuntimeError(f"injected failure inside the gather on rank {dist.get_rank()} (gather {calls[0]})")
            return original_gather(model, dtype)

        replica.gather_full_state_dict_as = gather


if __name__ == "__main__":
    install()
    sys.argv[0] = "trainer.fsdp_sft_trainer"
    sft.main()
