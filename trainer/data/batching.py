"""Batching tokenized SFT examples: `collate` into a padded `MicroBatch`, the seeded epoch orders
(shuffled, length-grouped), the split of a global batch over ranks balanced by tokens, the
token-budget micro-batches, `SFTBatches` (a step's micro-batches on one rank) and the validation
micro-batches (every rank runs as many forwards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from config.schema import DataConfig
from trainer.data.rows import DataError
from trainer.data.sft_examples import IGNORE, Example
from workers.micro_batches import split_to_count, token_budget_groups  # shared with RL's token-budget micro-batches


# ----------------------------------------------------------------------------- batching
@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE on prompt and padding
    examples: list[Example] = field(default_factory=list)

    @property
    def num_loss_tokens(self) -> int:
        return sum(e.num_loss_tokens for e in self.examples)

    @property
    def num_real_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_padded_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.examples,
        )


def collate(examples: Sequence[Example], pad_id: int, zero_loss: bool = False) -> MicroBatch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if not zero_loss:
            labels[i, :n] = torch.tensor(e.labels)
    return MicroBatch(ids, mask, labels, [] if zero_loss else list(examples))


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_examples))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


MEGABATCH_FACTOR = 50  # as HF Trainer's LengthGroupedSampler


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order in which each run of `batch_size` holds examples of similar length.

    The data are shuffled, cut into mega-batches of 50 batches, each sorted by length and cut
    into batches; then the batches are shuffled. Every epoch differs, every run with the same
    seed is the same, and a global batch is almost free of padding.
    """
    order = np.asarray(epoch_order(len(lengths), seed, epoch, True), dtype=np.int64)
    lengths = np.asarray(lengths)
    mega = batch_size * MEGABATCH_FACTOR
    batches = []
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")].tolist()  # longest first, ties in shuffled order
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7)
    return [i for k in torch.randperm(len(full), generator=g).tolist() for i in full[k]]


def balanced_shares(batch: Sequence[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Split a global batch over ranks with equal counts and near-equal token sums.

    Longest first, each to the rank with the fewest tokens that still has room: every rank
    then spends about the same time per step, whatever the length skew.
    """
    per_rank = len(batch) // world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    for i in sorted(batch, key=lambda i: (-lengths[i], i)):
        open_ranks = [r for r in range(world_size) if len(shares[r]) < per_rank]
        r = min(open_ranks, key=lambda r: (tokens[r], r))
        shares[r].append(i)
        tokens[r] += lengths[i]
    return shares


class SFTBatches:
    """The global batches of an epoch, and one rank's micro-batches of each.

    A global batch is `train_batch_size` examples (the last incomplete one is dropped). It is
    split over ranks balanced by tokens, then into micro-batches: `micro_batch_size_per_gpu`
    sequences of similar length, or, with `use_dynamic_bsz` (the default), as many as fit the
    token budget: fewer, fuller forwards (scripts/bench_sft.py measures the gain). Every rank
    computes every rank's plan (no communication) and all run the same number of forwards.
    Batches are a pure function of (seed, epoch, index), so resuming at any batch needs no
    iteration over the data. The loss is normalised by the global count of
    target tokens, so none of this changes what is learned.

    Why not packing (several sequences in one row, positions restarting per sequence): without
    flash-attention's varlen kernels (CPU, and SDPA on GPU) the attention inside a packed row
    needs a block-diagonal mask, and SDPA then computes the whole row's attention and masks most
    of it away. Measured on the benchmark's data and model (scripts/bench_sft.py, full size;
    transformers builds the block mask from the position ids), one packed row per step ran at
    ~2,000 real tokens/s against ~6,000 for these length-grouped micro-batches, with the same
    loss to 1e-7; and with length grouping the padding left to remove is ~3%. Packing is used
    where a varlen kernel makes it pay: `model.use_remove_padding` with flash-attention
    (workers/packing.py).
    """

    def __init__(self, examples: Sequence[Example], cfg: DataConfig, seed: int, rank: int, world_size: int, pad_id: int):
        self.examples = examples
        # A TokenizedDataset's lengths are its mapped int32 array: no walk over the examples.
        lengths = getattr(examples, "lengths", None)
        self.lengths = lengths if lengths is not None else np.array([len(e.input_ids) for e in examples], dtype=np.int32)
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad_id = pad_id
        self.steps_per_epoch = len(examples) // cfg.train_batch_size
        self._order: tuple[tuple[int, int], list[int]] = ((-1, -1), [])
        if self.steps_per_epoch == 0:
            raise DataError(
                f"data.train_batch_size={cfg.train_batch_size} is larger than the training set ({len(examples)} examples)"
            )

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order[0] != (self.seed, epoch):  # the seed moves when a rollback reshuffles
            if self.cfg.group_by_length and self.cfg.shuffle:
                order = length_grouped_order(self.lengths, self.cfg.train_batch_size, self.seed, epoch)
            else:
                order = epoch_order(len(self.examples), self.seed, epoch, self.cfg.shuffle)
            self._order = ((self.seed, epoch), order)
        return self._order[1]

    def global_batch(self, epoch: int, index: int) -> list[int]:
        size = self.cfg.train_batch_size
        return self._epoch_order(epoch)[index * size : (index + 1) * size]

    def rank_share(self, batch: list[int]) -> list[int]:
        return balanced_shares(batch, self.lengths, self.world_size)[self.rank]

    def plan(self, epoch: int, index: int) -> list[list[int]]:
        """This rank's micro-batches of step `index` of `epoch`, as example indices."""
        shares = balanced_shares(self.global_batch(epoch, index), self.lengths, self.world_size)
        budget = self.cfg.token_budget()
        if budget is None:
            size = self.cfg.micro_batch_size_per_gpu
            mine = sorted(shares[self.rank], key=lambda i: (-self.lengths[i], i))
            return [mine[i : i + size] for i in range(0, len(mine), size)]
        per_rank = [token_budget_groups(share, self.lengths, budget) for share in shares]
        count = max(len(groups) for groups in per_rank)
        return split_to_count(per_rank[self.rank], count)

    def micro_batches(self, epoch: int, index: int) -> list[MicroBatch]:
        return [collate([self.examples[i] for i in group], self.pad_id) for group in self.plan(epoch, index)]


def validation_micro_batches(examples: list[Example], micro_batch_size: int, rank: int, world_size: int, pad_id: int) -> list[MicroBatch]:
    """This rank's share of the validation set, padded with zero-loss batches so that every rank
    runs the same number of forwards (each is a collective under FSDP)."""
    mine = examples[rank::world_size]
    per_rank_max = math.ceil(len(examples) / world_size)
    count = math.ceil(per_rank_max / micro_batch_size)
    batches = [collate(mine[i : i + micro_batch_size], pad_id) for i in range(0, len(mine), micro_batch_size)]
    while len(batches) < count:
        batches.append(collate(examples[:1], pad_id, zero_loss=True))
    return batches
