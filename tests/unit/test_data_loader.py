"""ShardedBatches: determinism, disjoint equal shards, exact resume, evaluation padding, collation."""

from __future__ import annotations

import itertools

import pytest
import torch

from distft.data.format import IGNORE_INDEX
from distft.data.loader import ShardedBatches, collate
from distft.data.packing import PackedRow
from distft.errors import DataError

PAD = 0


def packed_rows(n: int, seq_len: int = 8) -> list[PackedRow]:
    """Equal-length rows; token 0 of row i is 100 + i so a batch tells which rows it holds."""
    return [
        PackedRow([100 + i] + [1] * (seq_len - 1), [IGNORE_INDEX] + [1] * (seq_len - 1), list(range(seq_len)))
        for i in range(n)
    ]


def ragged_rows(n: int) -> list[PackedRow]:
    """Unpacked rows of lengths 2..6: [100 + i, 7, 7, ...], prompt token unlabelled."""
    out = []
    for i in range(n):
        length = 2 + i % 5
        ids = [100 + i] + [7] * (length - 1)
        out.append(PackedRow(ids, [IGNORE_INDEX] + ids[1:], list(range(length))))
    return out


def row_ids(batch: dict) -> list[int]:
    """Which rows a batch holds (-1 for an evaluation padding row)."""
    return [int(x) - 100 if x >= 100 else -1 for x in batch["input_ids"][:, 0]]


def take(it, k: int) -> list[dict]:
    return list(itertools.islice(it, k))


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def loader(rows, **kw) -> ShardedBatches:
    args = {"micro_batch_size": 2, "rank": 0, "world_size": 1, "seed": 0} | kw
    return ShardedBatches(rows, **args)


def test_epoch_order_follows_seeded_randperm():
    rows = packed_rows(10)
    ld = loader(rows, micro_batch_size=3, rank=1, world_size=2, seed=5)
    for epoch in range(3):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        got = [r for batch in ld for r in row_ids(batch)]
        assert got == perm[1::2][:5]
    assert ld.state_dict() == {"epoch": 3, "index": 0}


def test_same_seed_same_batches_other_seed_or_epoch_other_order():
    rows = packed_rows(32)
    a = take(loader(rows, seed=3).forever(), 32)
    b = take(loader(rows, seed=3).forever(), 32)
    c = take(loader(rows, seed=4).forever(), 32)
    assert_batches_equal(a, b)
    order = [r for batch in a for r in row_ids(batch)]
    assert order != [r for batch in c for r in row_ids(batch)]
    assert order[:32] != order[32:] and sorted(order[:32]) == sorted(order[32:]) == list(range(32))


def test_no_shuffle_is_identity_order():
    ld = loader(packed_rows(6), shuffle=False, micro_batch_size=4)
    assert [row_ids(b) for b in ld] == [[0, 1, 2, 3], [4, 5]]
    assert [row_ids(b) for b in ld] == [[0, 1, 2, 3], [4, 5]]


@pytest.mark.parametrize("n,world", [(23, 4), (8, 2), (7, 7), (10, 3)])
def test_rank_shards_are_disjoint_and_equal_sized(n, world):
    rows = packed_rows(n)
    shards = []
    for rank in range(world):
        ld = loader(rows, rank=rank, world_size=world, micro_batch_size=2, seed=11)
        assert len(ld) == -(-(n // world) // 2)
        shards.append([r for batch in ld for r in row_ids(batch)])
    assert all(len(s) == n // world for s in shards)
    flat = [r for s in shards for r in s]
    assert len(set(flat)) == len(flat) == (n // world) * world


@pytest.mark.parametrize("consumed", [0, 1, 4, 5, 6, 13])
def test_resume_yields_exactly_the_same_next_batches(consumed):
    rows = packed_rows(21)  # world 2 -> 10 rows/rank -> 4 micro-batches of 3 (last has 1): epoch edge at 4
    kw = {"micro_batch_size": 3, "rank": 1, "world_size": 2, "seed": 9}
    original = loader(rows, **kw)
    it = original.forever()
    take(it, consumed)
    state = original.state_dict()
    assert state == {"epoch": consumed // 4, "index": consumed % 4}

    resumed = loader(rows, **kw)
    resumed.load_state_dict(dict(state))
    assert_batches_equal(take(resumed.forever(), 7), take(it, 7))  # crosses at least one epoch boundary


def test_state_is_advanced_when_a_batch_is_handed_out():
    ld = loader(packed_rows(8), micro_batch_size=2)  # 4 batches per epoch
    it = iter(ld)
    next(it)
    assert ld.state_dict() == {"epoch": 0, "index": 1}  # a checkpoint now resumes at the next batch
    for _ in range(3):
        next(it)
    assert ld.state_dict() == {"epoch": 1, "index": 0}
    with pytest.raises(StopIteration):
        next(it)
    assert len(list(ld)) == 4  # the next `for` loop is the whole of epoch 1
    assert ld.state_dict() == {"epoch": 2, "index": 0}


def test_iter_resumes_mid_epoch_and_stops_at_epoch_end():
    ld = loader(packed_rows(8), micro_batch_size=2)
    ld.load_state_dict({"epoch": 1, "index": 3})
    assert len(list(ld)) == 1
    assert ld.state_dict() == {"epoch": 2, "index": 0}


@pytest.mark.parametrize("state", [{"epoch": 0, "index": 4}, {"epoch": -1, "index": 0}])
def test_load_state_rejects_positions_outside_the_epoch(state):
    with pytest.raises(ValueError, match="does not fit"):
        loader(packed_rows(8), micro_batch_size=2).load_state_dict(state)


@pytest.mark.parametrize("rows_fn", [packed_rows, ragged_rows])
def test_pad_to_equal_keeps_every_row_and_pads_with_untrained_rows(rows_fn):
    n, world = 11, 4  # ranks get 3, 3, 3, 2 real rows -> rank 3 gets one empty row
    rows = rows_fn(n)
    seen, lengths = [], set()
    for rank in range(world):
        ld = loader(rows, rank=rank, world_size=world, micro_batch_size=2, pad_to_equal=True, shuffle=False)
        batches = list(ld)
        lengths.add(len(batches))
        for batch in batches:
            ids = row_ids(batch)
            seen += [r for r in ids if r >= 0]
            for b, r in enumerate(ids):
                if r < 0:
                    assert (batch["labels"][b] == IGNORE_INDEX).all()
                    assert (batch["input_ids"][b] == PAD).all()
            real = [b for b, r in enumerate(ids) if r >= 0]
            assert batch["num_loss_tokens"] == int((batch["labels"][real, 1:] != IGNORE_INDEX).sum())
    assert lengths == {2}
    assert sorted(seen) == list(range(n))


def test_too_few_rows_for_the_ranks():
    with pytest.raises(DataError, match="only 3 row"):
        loader(packed_rows(3), world_size=4, rank=0)
    assert len(loader(packed_rows(3), world_size=4, rank=3, pad_to_equal=True)) == 1


@pytest.mark.parametrize("kw", [{"micro_batch_size": 0}, {"rank": 2, "world_size": 2}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        loader(packed_rows(4), **kw)


# --- collation ----------------------------------------------------------------------------------------


def test_equal_length_rows_get_no_attention_mask():
    rows = [
        PackedRow(
            [5, 6, 7, 8, 9, 0],
            [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, 9, IGNORE_INDEX],
            [0, 1, 0, 1, 2, 0],
        ),
        PackedRow([1, 2, 3, 4, 5, 6], [IGNORE_INDEX, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5]),
    ]
    batch = collate(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_loss_tokens"}
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.long
    assert batch["position_ids"].tolist() == [r.position_ids for r in rows]
    assert batch["num_loss_tokens"] == 2 + 5


def test_ragged_rows_are_right_padded_with_mask():
    rows = [PackedRow([5, 6, 7], [IGNORE_INDEX, 6, 7], [0, 1, 2]), PackedRow([8], [8], [0])]
    batch = collate(rows, pad_id=99)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2] and batch["position_ids"][1, 0] == 0
    # label at position 0 is never a target after the shift, so row 2's lone label does not count
    assert batch["num_loss_tokens"] == 2


def test_num_loss_tokens_is_the_number_of_terms_in_the_shifted_loss():
    torch.manual_seed(0)
    rows = ragged_rows(7)
    batch = collate(rows, pad_id=PAD)
    logits = torch.randn(*batch["input_ids"].shape, 16)
    shifted_logits, shifted_labels = logits[:, :-1].reshape(-1, 16), batch["labels"][:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, reduction="sum")
    mean = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, reduction="mean")
    torch.testing.assert_close(total / batch["num_loss_tokens"], mean)
    assert batch["num_loss_tokens"] == sum(len(r.input_ids) - 1 for r in rows)


@pytest.mark.parametrize("rows,kw", [
    (ragged_rows(23), {"micro_batch_size": 3, "world_size": 3}),
    (ragged_rows(9), {"micro_batch_size": 2, "world_size": 2, "pad_to_equal": True, "shuffle": False}),
    (packed_rows(10), {"micro_batch_size": 1, "world_size": 4}),
    (ragged_rows(7), {"micro_batch_size": 4, "world_size": 1}),
], ids=["ragged-3-ranks", "eval-padding", "packed-4-ranks", "one-rank"])
def test_every_batch_carries_the_counts_of_all_ranks_together(rows, kw):
    """What the loop no longer all-reduces before each step: the global batch's answer tokens and tokens."""
    world = kw["world_size"]
    per_rank = [take(loader(rows, rank=r, seed=1, **kw).forever(), 3 * len(loader(rows, seed=1, **kw)) + 1)
                for r in range(world)]
    for batches in zip(*per_rank, strict=True):
        loss_tokens = sum(b["num_loss_tokens"] for b in batches)
        tokens = sum(b["input_ids"].numel() for b in batches)
        assert all(b["global_num_loss_tokens"] == loss_tokens for b in batches)
        assert all(b["global_num_tokens"] == tokens for b in batches)
    assert len({b["global_num_loss_tokens"] for b in per_rank[0]}) > 1 or world == 4  # ragged counts vary
