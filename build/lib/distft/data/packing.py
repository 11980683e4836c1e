"""Pack encoded examples into fixed-length rows without cross-attention between them.

Each example inside a row gets ``position_ids`` that restart at 0. Transformers (>= 4.53) reads such
restarts when the model is called with ``attention_mask=None, position_ids=..., use_cache=False`` and
builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``): a new segment
starts wherever ``position_ids[t] - position_ids[t-1] != 1``. ``use_cache=False`` matters: with a cache
(the config default is ``use_cache=True``, also in eval mode) transformers skips the detection and the
examples silently attend to each other.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from distft.data.format import IGNORE_INDEX, Encoded


@dataclass
class PackedRow:
    """One row of a batch: all three lists have the same length."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def _segment(input_ids: list[int], labels: list[int]) -> PackedRow:
    """One example as a segment. Its first label is ignored: no earlier token of the segment predicts it."""
    return PackedRow(list(input_ids), [IGNORE_INDEX, *labels[1:]], list(range(len(input_ids))))


def _best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign items to bins of ``capacity``: longest first, each into the fullest bin it still fits.

    Deterministic (ties broken by item index, then by bin creation order). O(n log n) lookups.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos == len(free):
            bins.append([i])
            remaining, b = capacity - lengths[i], len(bins) - 1
        else:
            remaining, b = free.pop(pos)
            bins[b].append(i)
            remaining -= lengths[i]
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    return bins


def pack_examples(encoded: Sequence[Encoded], seq_len: int, pad_id: int) -> list[PackedRow]:
    """Pack ``(input_ids, labels)`` examples into rows of exactly ``seq_len`` tokens.

    Uses best-fit decreasing for a high fill. The padding tail of a row is ``pad_id`` tokens with labels
    ``-100`` and its own ``position_ids`` 0, 1, 2, ... so it forms a separate segment. Row order is
    deterministic for the same input.

    Raises:
        ValueError: An example is longer than ``seq_len`` (drop those first with ``encode_examples``).
    """
    lengths = [len(ids) for ids, _ in encoded]
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} example(s) longer than seq_len={seq_len} (first: #{too_long[0]})")
    rows = []
    for members in _best_fit_decreasing(lengths, seq_len):
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for i in members:
            seg = _segment(*encoded[i])
            input_ids += seg.input_ids
            labels += seg.labels
            position_ids += seg.position_ids
        tail = seq_len - len(input_ids)
        input_ids += [pad_id] * tail
        labels += [IGNORE_INDEX] * tail
        position_ids += list(range(tail))
        rows.append(PackedRow(input_ids, labels, position_ids))
    return rows


def unpacked_rows(encoded: Sequence[Encoded]) -> list[PackedRow]:
    """One example per row, no padding (for ``packing=False``; the collator pads each micro-batch)."""
    return [_segment(ids, labels) for ids, labels in encoded]


def _padding_tail(row: PackedRow) -> int:
    """Length of the row's padding tail: its last segment, if no label in it is trained on.

    Every real example trains on at least its eos token, so a trailing segment with only ``-100``
    labels is padding.
    """
    pos = row.position_ids
    start = len(pos) - 1
    while start > 0 and pos[start] - pos[start - 1] == 1:
        start -= 1
    if not pos or any(label != IGNORE_INDEX for label in row.labels[start:]):
        return 0
    return len(pos) - start


def padding_stats(rows: Sequence[PackedRow], seq_len: int) -> dict:
    """How much of ``len(rows) * seq_len`` token slots hold real tokens.

    For unpacked rows this measures padding every example to ``seq_len``. ``answer_tokens`` counts
    labels that are trained on.
    """
    non_padding = sum(len(r.input_ids) - _padding_tail(r) for r in rows)
    tokens = len(rows) * seq_len
    return {
        "rows": len(rows),
        "tokens": tokens,
        "non_padding_tokens": non_padding,
        "non_padding_fraction": non_padding / tokens if tokens else 0.0,
        "answer_tokens": sum(sum(label != IGNORE_INDEX for label in r.labels) for r in rows),
    }
