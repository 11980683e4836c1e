"""ShardedBatches: determinism, disjoint equal shards, exact resume, evaluation padding, collation."""

from __future__ import annotations

import itertools

import pytest
import torch

from distft.data.format import IGNORE_INDEX
from distft.data.loader import ShardedBatches, collate
from distft.data.packing import PackedRow
from distft.errors import DataError, UserError

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


def position(ld: ShardedBatches) -> dict:
    """The part of the state that names the next micro-batch."""
    state = ld.state_dict()
    return {"epoch": state["epoch"], "index": state["index"]}


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
    assert position(ld) == {"epoch": 3, "index": 0}


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
    assert position(original) == {"epoch": consumed // 4, "index": consumed % 4}

    resumed = loader(rows, **kw)
    resumed.load_state_dict(dict(state))
    assert_batches_equal(take(resumed.forever(), 7), take(it, 7))  # crosses at least one epoch boundary


def test_state_is_advanced_when_a_batch_is_handed_out():
    ld = loader(packed_rows(8), micro_batch_size=2)  # 4 batches per epoch
    it = iter(ld)
    next(it)
    assert position(ld) == {"epoch": 0, "index": 1}  # a checkpoint now resumes at the next batch
    for _ in range(3):
        next(it)
    assert position(ld) == {"epoch": 1, "index": 0}
    with pytest.raises(StopIteration):
        next(it)
    assert len(list(ld)) == 4  # the next `for` loop is the whole of epoch 1
    assert position(ld) == {"epoch": 2, "index": 0}


def test_iter_resumes_mid_epoch_and_stops_at_epoch_end():
    ld = loader(packed_rows(8), micro_batch_size=2)
    ld.load_state_dict({"epoch": 1, "index": 3})
    assert len(list(ld)) == 1
    assert position(ld) == {"epoch": 2, "index": 0}


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


# --- resuming on another number of workers --------------------------------------------------------------


def step_rows(rows, *, world: int, micro: int, global_batch: int, steps: int, state: dict | None = None,
              saved_at: int = 0) -> list[list[int]]:
    """The rows each optimizer step trains on, all workers together, as the loop draws them: every rank takes
    global_batch // (world * micro) micro-batches per step. `state` (saved after `saved_at` steps): resume there.

    "The same rows" means the same set of rows per step: which worker and micro-batch holds a row differs between
    layouts, and does not matter, since a step's loss is normalised by the step's answer tokens."""
    loaders = [loader(rows, micro_batch_size=micro, rank=r, world_size=world, seed=3) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(dict(state), step=saved_at, global_batch_size=global_batch)
    streams = [ld.forever() for ld in loaders]
    accum = global_batch // (world * micro)
    out = []
    for _ in range(steps):
        out.append(sorted(r for it in streams for batch in take(it, accum) for r in row_ids(batch)))
    return out


def saved_state(rows, *, world: int, micro: int, global_batch: int, steps: int) -> dict:
    """Rank 0's loader state after `steps` steps (every rank's position is the same)."""
    ld = loader(rows, micro_batch_size=micro, rank=0, world_size=world, seed=3)
    take(ld.forever(), steps * global_batch // (world * micro))
    return ld.state_dict()


# (rows, old workers, old micro-batch, new workers, new micro-batch, global batch); the resumed steps cross epochs
LAYOUTS = [(22, 2, 1, 1, 1, 4), (22, 1, 1, 2, 1, 4), (24, 2, 1, 4, 1, 8), (40, 4, 2, 2, 2, 16),
           (22, 2, 1, 1, 2, 4),  # W x b kept: the same micro-batches ...
           (22, 2, 2, 1, 4, 8),  # ... even where an epoch ends on a short one (11 rows per worker, micro-batch 2)
           (24, 1, 2, 1, 1, 4)]  # only the micro-batch size changes


@pytest.mark.parametrize("n,old_world,old_micro,new_world,new_micro,global_batch", LAYOUTS)
@pytest.mark.parametrize("saved_at", [1, 3, 6])
def test_resume_on_another_layout_trains_every_step_on_the_rows_of_an_uninterrupted_run(
        n, old_world, old_micro, new_world, new_micro, global_batch, saved_at):
    rows, more = packed_rows(n), 9
    old = {"world": old_world, "micro": old_micro, "global_batch": global_batch}
    new = {"world": new_world, "micro": new_micro, "global_batch": global_batch}
    state = saved_state(rows, **old, steps=saved_at)
    assert state["world_size"] == old_world and state["micro_batch_size"] == old_micro
    resumed = step_rows(rows, **new, steps=more, state=state, saved_at=saved_at)
    uninterrupted_new = step_rows(rows, **new, steps=saved_at + more)
    uninterrupted_old = step_rows(rows, **old, steps=saved_at + more)
    assert resumed == uninterrupted_new[saved_at:]  # the curve the new layout would have drawn ...
    assert uninterrupted_new == uninterrupted_old  # ... which is the old layout's, step for step, from step 1
    assert len(resumed) == more and all(resumed)


def test_a_position_saved_with_the_same_layout_or_without_one_is_taken_as_it_is():
    ld = loader(packed_rows(8), micro_batch_size=2, world_size=2)
    ld.load_state_dict({"epoch": 4, "index": 1})  # a checkpoint of a distft that recorded no layout
    assert position(ld) == {"epoch": 4, "index": 1}
    ld.load_state_dict({**ld.state_dict(), "epoch": 2})  # no step or global batch needed
    assert position(ld) == {"epoch": 2, "index": 1}
    with pytest.raises(ValueError, match="needs the step"):
        ld.load_state_dict({**ld.state_dict(), "world_size": 1})


def _refusal(n, old_world, old_micro, new_world, new_micro, global_batch, *, saved_at=2, new_global=None,
             **new_kw) -> str:
    state = saved_state(packed_rows(n), world=old_world, micro=old_micro, global_batch=global_batch, steps=saved_at)
    ld = loader(packed_rows(new_kw.pop("rows", n)), micro_batch_size=new_micro, rank=0, world_size=new_world,
                **{"seed": 3, **new_kw})
    with pytest.raises(UserError) as refused:
        ld.load_state_dict(state, step=saved_at, global_batch_size=new_global or global_batch)
    return str(refused.value)


def test_an_epoch_of_other_rows_is_refused_with_the_worker_counts_that_would_work():
    message = _refusal(23, 2, 1, 1, 1, 4)  # 2 workers keep 11 rows each of 23, 1 worker all of them
    assert "an epoch trains on 22 of the 23 rows on 2 worker(s) but on 23 on 1" in message
    assert message.endswith(". Resume with scaling.num_workers=2")
    message = _refusal(26, 2, 1, 4, 1, 8)  # 26 rows on 2 workers, 24 on 4: 1 worker keeps all 26 too
    assert "but on 24 on 4" in message
    assert message.endswith(". Resume with scaling.num_workers=2 (or scaling.num_workers=1)")


def test_steps_that_would_cut_the_epochs_elsewhere_are_refused():
    # 11 rows per worker in micro-batches of 2: each epoch ends on a micro-batch of 1 row per worker, which 1
    # worker with micro-batches of 2 would not have, so steps after the first epoch end would hold other rows
    message = _refusal(22, 2, 2, 1, 2, 8)
    assert "steps would cut the epochs at other rows (11 rows per worker on 2 worker(s)" in message
    assert message.endswith(". Resume with scaling.num_workers=2")


def test_another_global_batch_or_other_data_is_refused():
    message = _refusal(24, 2, 1, 1, 1, 4, new_global=8)
    assert "not where 2 steps of 8 rows on 2 worker(s) end: it was trained with another trainer.global_batch_size" \
        in message
    assert "training rows" in _refusal(22, 2, 1, 1, 1, 4, rows=24)
    assert "seed=3 shuffle=True, this run with seed=4" in _refusal(22, 2, 1, 1, 1, 4, seed=4)


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
