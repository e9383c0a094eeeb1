"""What a micro-batch becomes at the model's input: padded rows, or padding-free (packed) rows,
optionally cut along the sequence for Ulysses sequence parallelism.

- Padded (the default): [B, L] right-padded rows and their 2D attention mask, as collated.
- Packed (`model.use_remove_padding`): the micro-batch's real tokens in one row, positions
  restarting per sequence. With flash-attention (CUDA) the kernel keeps the sequences apart
  from `cu_seq_lens` (transformers' varlen path, as its DataCollatorWithFlattening); elsewhere
  position ids alone do NOT keep them apart (sdpa and eager attend across the whole row), so
  the exact path there is a 4D block-diagonal causal mask, which costs L² per row.
- Sequence-parallel: padded to a multiple of N and cut into N parts; each rank gets its part of
  the ids, positions and targets, and the attention sees the whole sequence (a 4D mask over the
  full length, or `cu_seq_lens` of the full row).

Targets are shifted before anything is cut (`targets[i]` is the token that logits[i] predict),
so a sequence's last token on one rank and its next token on another still pair up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from workers.sequence_parallel import SequenceParallel

IGNORE = -100
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")  # kernels that take cu_seq_lens


@dataclass(frozen=True)
class Layout:
    packed: bool = False  # padding-free rows
    varlen: bool = False  # the attention kernel takes cu_seq_lens (flash-attention)


def choose_layout(use_remove_padding: bool, attn_implementation: str, sp_size: int = 1) -> Layout:
    """Packed rows only where a varlen kernel keeps the sequences apart: elsewhere the block mask
    that would do it costs more than the padding it saves (length-grouped batches have ~3%).
    Flash-attention takes no padding mask, so sequence parallelism with it always packs (as verl)."""
    varlen = attn_implementation in VARLEN_ATTENTION
    return Layout(packed=varlen and (use_remove_padding or sp_size > 1), varlen=varlen)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: token i attends to j <= i of the same segment. Padding has segments of
    its own (each pad token attends only to itself), so no row is empty (no NaN in softmax)."""
    length = segments.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def model_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int,
    layout: Layout = Layout(), sp: Optional[SequenceParallel] = None,
) -> tuple[dict, torch.Tensor]:
    """The model's keyword arguments and this rank's next-token targets ([B', L'], IGNORE where
    there is none) for a right-padded micro-batch."""
    parallel = sp is not None and sp.size > 1
    if not layout.packed and not parallel:  # today's path, bit for bit
        return {"input_ids": input_ids, "attention_mask": attention_mask}, shifted_targets(labels)

    targets = shifted_targets(labels)
    real = attention_mask.bool()
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    length = input_ids.size(1)
    if layout.packed:
        lengths = real.sum(1)
        row = torch.arange(input_ids.size(0), device=input_ids.device)[:, None].expand_as(input_ids)
        ids, positions, targets, segments = (t[real][None] for t in (input_ids, positions, targets, row))
    else:
        lengths = None
        pad_segment = -1 - torch.arange(length, device=input_ids.device)  # one per pad token
        ids, segments = input_ids, torch.where(real, 0, pad_segment[None])

    size = sp.size if parallel else 1
    tail = -ids.size(1) % size
    if tail:  # the part each rank holds must be the same length
        batch = ids.size(0)
        ids = torch.cat([ids, ids.new_full((batch, tail), pad_id)], 1)
        positions = torch.cat([positions, positions.new_zeros(batch, tail)], 1)
        targets = torch.cat([targets, targets.new_full((batch, tail), IGNORE)], 1)
        pad_segment = -1 - length - torch.arange(tail, device=ids.device)
        segments = torch.cat([segments, pad_segment[None].expand(batch, tail)], 1)

    kwargs: dict = {}
    if layout.packed and layout.varlen:
        # flash-attention's varlen path (CUDA): the full row's boundaries; the SP tail is a sequence of its own.
        seq_lens = [int(n) for n in lengths.tolist() if n > 0] + ([tail] if tail else [])
        cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32, device=ids.device)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(seq_lens), max_length_k=max(seq_lens))
    else:
        kwargs["attention_mask"] = block_causal_mask(segments)

    if parallel:
        part = ids.size(1) // size
        cut = slice(sp.rank * part, (sp.rank + 1) * part)
        ids, positions, targets = ids[:, cut], positions[:, cut], targets[:, cut]
    kwargs.update(input_ids=ids, position_ids=positions)
    return kwargs, targets
