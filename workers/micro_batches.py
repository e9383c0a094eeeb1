"""Token-budget micro-batches: one rank's sequences cut into forwards of at most N tokens,
counted as the forward computes them (rows × padded width).

Used by SFT (trainer/data/batching.py: `SFTBatches.plan`) and RL (workers/actor.py). A sequence
is one or more padded segments: SFT pads one (right-padded examples), RL two (left-padded
prompts, then right-padded responses), so a micro-batch's width is the sum of each segment's
longest. Pure functions: every rank computes its own plan; agreeing on the count (every forward
of a sharded model is a collective) is the caller's one all-reduce.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

Lengths = Union[Sequence[int], tuple[Sequence[int], ...]]  # one length per sequence, or one array per segment


def _segments(lengths: Lengths) -> tuple[Sequence[int], ...]:
    return lengths if isinstance(lengths, tuple) else (lengths,)


def padded_tokens(group: Sequence[int], lengths: Lengths) -> int:
    """Tokens one forward of `group` computes: rows × (the sum of each segment's longest)."""
    return len(group) * sum(max(int(seg[i]) for i in group) for seg in _segments(lengths))


def _by_length(indices: Iterable[int], segments: tuple[Sequence[int], ...]) -> list[int]:
    return sorted(indices, key=lambda i: (-sum(int(seg[i]) for seg in segments), i))  # longest first, ties by index


def token_budget_groups(indices: Iterable[int], lengths: Lengths, budget: int) -> list[list[int]]:
    """Length-sorted micro-batches, each within `budget` padded tokens: the fewest forwards that
    cutting the sorted order allows, with the least padding. A sequence longer than the budget
    gets a group of its own (the callers check lengths against their budget first)."""
    segments = _segments(lengths)
    groups: list[list[int]] = []
    widths: list[int] = []  # the current group's longest per segment
    for i in _by_length(indices, segments):
        own = [int(seg[i]) for seg in segments]
        if groups:
            grown = [max(w, o) for w, o in zip(widths, own)]
            if (len(groups[-1]) + 1) * sum(grown) <= budget:
                groups[-1].append(i)
                widths = grown
                continue
        groups.append([i])
        widths = own
    return groups


def split_to_count(groups: list[list[int]], count: int) -> list[list[int]]:
    """Split the largest groups until there are `count` (every rank runs as many forwards)."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        k = max(range(len(groups)), key=lambda k: (len(groups[k]), -k))
        if len(groups[k]) < 2:
            break
        g = groups.pop(k)
        groups[k:k] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return groups


def balanced_groups(indices: Sequence[int], lengths: Lengths, budget: int, count: int) -> list[list[int]]:
    """Exactly `count` micro-batches within `budget` (count at least `len(token_budget_groups(...))`),
    balanced: the largest micro-batch, in padded tokens, is as small as cutting the length-sorted
    order allows. verl balances its micro-batches too (verl/utils/seqlen_balancing.py,
    `rearrange_micro_batches`: karmarkar-karp over the real tokens, as its forwards drop the
    padding); forwards here are padded, so the cut stays in length order, which keeps the padding
    low, and only where it falls is balanced. Splitting never grows a group, so the budget holds."""
    segments = _segments(lengths)
    if count > len(indices):
        raise ValueError(f"{count} micro-batches asked of {len(indices)} sequences")
    low = max(sum(int(seg[i]) for seg in segments) for i in indices)  # no group is smaller than its longest row
    high = budget
    while low < high:  # the smallest cap that still cuts into `count` groups or fewer (monotone in the cap)
        cap = (low + high) // 2
        if len(token_budget_groups(indices, segments, cap)) <= count:
            high = cap
        else:
            low = cap + 1
    groups = split_to_count(token_budget_groups(indices, segments, high), count)
    if len(groups) != count:  # fewer than the budget needs (the caller's count is too small)
        raise ValueError(f"{len(indices)} sequences do not fit in {count} micro-batches of {budget} tokens")
    return groups
