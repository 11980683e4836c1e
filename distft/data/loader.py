"""Deterministic, resumable micro-batches of one rank's disjoint shard of rows.

No torch DataLoader: the rows are already tokenized and packed in memory, and a plain object with an
``(epoch, index)`` state is easy to checkpoint and restore exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from distft.data.format import IGNORE_INDEX
from distft.data.packing import PackedRow
from distft.errors import DataError, UserError


def collate(rows: Sequence[PackedRow], pad_id: int) -> dict:
    """Stack rows into a batch of LongTensors ``[B, L]``.

    Rows of unequal length are right-padded (``pad_id``, label ``-100``) and an ``attention_mask`` is
    added; equal-length (packed) rows get none, so the model reads segment boundaries from
    ``position_ids``. ``num_loss_tokens`` counts ``labels[:, 1:] != -100``: the loss compares
    ``logits[:, :-1]`` with ``labels[:, 1:]`` (token t predicts t+1), so this is the number of terms in
    the summed loss, the right divisor for a per-token mean across micro-batches and ranks.
    """
    lengths = [len(r.input_ids) for r in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    # Padding positions continue the row's count; with right padding and a causal mask no real token
    # ever attends to them, and the attention_mask hides them anyway.
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        input_ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(row.labels, dtype=torch.long)
        position_ids[b, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if len(set(lengths)) > 1:
        batch["attention_mask"] = attention_mask
    batch["num_loss_tokens"] = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return batch


class ShardedBatches:
    """Deterministic, resumable micro-batches of one rank's disjoint shard.

    Epoch ``e`` permutes the rows with ``torch.randperm(n, generator=manual_seed(seed + e))`` (identity
    when ``shuffle=False``); rank ``r`` takes ``perm[r::world_size]``. By default each rank keeps
    ``n // world_size`` rows (drop_last) so all ranks run the same number of steps. With
    ``pad_to_equal=True`` (evaluation) no row is dropped: shorter shards are topped up with empty rows
    (``pad_id`` tokens, all labels ``-100``) so every rank still has the same number of micro-batches.

    The state ``{"epoch", "index"}`` always names the next micro-batch to produce; it advances as each
    batch is handed out, so ``state_dict()`` taken right after a batch resumes at the following one.
    Use one iterator at a time. The state also records the world size and micro-batch size it counts in, so a
    loader with others can take it over where that is exact (``convert_position``).

    Every rank holds all the rows and knows every rank's shard, so each batch also carries the counts of the
    same micro-batch on all ranks together: ``global_num_loss_tokens`` and ``global_num_tokens`` (the sums of
    ``num_loss_tokens`` and of ``input_ids.numel()`` over ranks) — what the training loop would otherwise
    all-reduce before every step.
    """

    def __init__(
        self,
        rows: list[PackedRow],
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        pad_id: int = 0,
        pad_to_equal: bool = False,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rows = rows
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.pad_to_equal = pad_to_equal
        n = len(rows)
        self.rows_per_rank = math.ceil(n / world_size) if pad_to_equal else n // world_size
        if self.rows_per_rank == 0:
            raise DataError(
                f"only {n} row(s) for {world_size} rank(s): every rank needs at least one row "
                f"(use more data, a larger data.max_train_examples, or fewer workers)"
            )
        self.epoch = 0
        self.index = 0
        self._empty = self._empty_row()
        self._global: tuple[int, list[tuple[int, int]]] | None = None  # (epoch, counts per micro-batch index)
        self._row_counts: dict[int | None, tuple[int, int]] | None = None

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank (the last one may be smaller)."""
        return math.ceil(self.rows_per_rank / self.micro_batch_size)

    def shard(self, epoch: int, rank: int | None = None) -> list[int | None]:
        """Row indices of this rank (or of ``rank``) for ``epoch``; ``None`` marks an empty padding row."""
        rank = self.rank if rank is None else rank
        n = len(self.rows)
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            perm = list(range(n))
        mine: list[int | None] = list(perm[rank :: self.world_size][: self.rows_per_rank])
        return mine + [None] * (self.rows_per_rank - len(mine))

    def global_counts(self, epoch: int) -> list[tuple[int, int]]:
        """(loss tokens, tokens) of each micro-batch index of ``epoch``, summed over all ranks' shards: the
        ``num_loss_tokens`` and ``input_ids.numel()`` that ``collate`` gives each rank's batch."""
        if self._global is None or self._global[0] != epoch:
            if self._row_counts is None:  # (loss tokens, length) per row, and for the empty row (index None)
                self._row_counts = {j: (sum(label != IGNORE_INDEX for label in r.labels[1:]), len(r.input_ids))
                                    for j, r in [*enumerate(self.rows), (None, self._empty)]}
            b, counts = self.micro_batch_size, [(0, 0)] * len(self)
            for rank in range(self.world_size):
                shard = self.shard(epoch, rank)
                for i in range(len(self)):
                    rows = [self._row_counts[j] for j in shard[i * b : (i + 1) * b]]
                    loss, tokens = sum(r[0] for r in rows), len(rows) * max(r[1] for r in rows)
                    counts[i] = (counts[i][0] + loss, counts[i][1] + tokens)
            self._global = (epoch, counts)
        return self._global[1]

    def _empty_row(self) -> PackedRow:
        """A row that trains on nothing; as long as the rows when they all share one length."""
        lengths = {len(r.input_ids) for r in self.rows}
        n = lengths.pop() if len(lengths) == 1 else 1
        return PackedRow([self.pad_id] * n, [IGNORE_INDEX] * n, list(range(n)))

    def __iter__(self) -> Iterator[dict]:
        """Yield the rest of the current epoch, from the saved position, advancing the state."""
        epoch, start = self.epoch, self.index
        shard = self.shard(epoch)
        b = self.micro_batch_size
        for i in range(start, len(self)):
            rows = [self.rows[j] if j is not None else self._empty for j in shard[i * b : (i + 1) * b]]
            batch = collate(rows, self.pad_id)
            batch["global_num_loss_tokens"], batch["global_num_tokens"] = self.global_counts(epoch)[i]
            if i + 1 == len(self):
                self.epoch, self.index = epoch + 1, 0
            else:
                self.epoch, self.index = epoch, i + 1
            yield batch

    def forever(self) -> Iterator[dict]:
        """Yield micro-batches across all epochs, from the saved position (for step-based training)."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        """The position of the next micro-batch, ``{"epoch", "index"}``, with what it counts in (world size,
        micro-batch size, rows, seed, shuffle), so that a resume on another number of workers can convert it."""
        return {"epoch": self.epoch, "index": self.index, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "rows": len(self.rows), "seed": self.seed,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict, *, step: int | None = None, global_batch_size: int | None = None) -> None:
        """Resume at a position saved by ``state_dict``.

        Saved with this world size and micro-batch size (or by a distft that did not record them), the position is
        taken as it is. Saved with others, it is converted (see `convert_position`), which needs the optimizer
        `step` it was saved at and this run's `global_batch_size` (rows per step, all workers together).
        """
        geometry = (state.get("world_size", self.world_size), state.get("micro_batch_size", self.micro_batch_size))
        if geometry != (self.world_size, self.micro_batch_size):
            if step is None or global_batch_size is None:
                raise ValueError(f"loader state {state} was saved with another world size or micro-batch size; "
                                 "converting it needs the step it was saved at and the global batch size")
            state = self.convert_position(state, step=step, global_batch_size=global_batch_size)
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self):
            raise ValueError(
                f"loader state {state} does not fit this loader ({len(self)} micro-batches per epoch); "
                f"was it saved with different data, micro_batch_size or world_size?"
            )
        self.epoch, self.index = epoch, index

    def convert_position(self, state: dict, *, step: int, global_batch_size: int) -> dict:
        """This loader's ``{"epoch", "index"}`` for a position saved after `step` optimizer steps by a loader over
        the same rows with another world size or micro-batch size; a `UserError` where the carry-over is not exact.

        Exact means that every optimizer step, before and after the checkpoint, trains on the same set of rows
        under both layouts, so a resumed run continues the curve an uninterrupted one would have drawn (up to the
        order in which floats are summed; the loss of a step is normalised by the step's answer tokens, so how the
        rows are split into micro-batches and workers does not matter). Micro-batch ``i`` of epoch ``e`` is
        ``perm_e[W*b*i : W*b*(i+1)]`` over all ``W`` workers with ``b`` rows each (rank ``r`` holds every ``W``-th
        row from ``r``), so the rows run through each epoch's permutation in order, and a step takes the next
        ``global_batch_size // (W*b)`` micro-batches. Both layouts therefore group rows identically when:

        - the rows, seed and shuffling are the same (``perm_e`` is);
        - an epoch uses the same rows: each worker keeps ``rows // W`` of them, so ``W * (rows // W)`` must not
          change (drop_last leaves ``rows % W`` out of every epoch);
        - steps cut the epoch at the same rows: either ``W*b`` stays the same (the same micro-batches), or no
          micro-batch is partial under either layout (``(rows // W) % b == 0``), so every step is the next
          ``global_batch_size`` rows;
        - the global batch is the one the checkpointed run trained with: its position must be exactly where
          `step` steps of ``global_batch_size`` rows end (a run whose global batch changed on an earlier resume
          cannot be continued exactly on another layout).

        The converted position is then where `step` steps of this run end.
        """
        if self.pad_to_equal:
            raise ValueError("positions of a loader with pad_to_equal=True (evaluation) are never converted")
        old = (int(state["world_size"]), int(state["micro_batch_size"]))
        new = (self.world_size, self.micro_batch_size)
        n = len(self.rows)
        problems = []
        if state.get("rows") != n:
            problems.append(f"the checkpoint's data has {state.get('rows')} training rows, this run's {n}")
        if (state.get("seed"), state.get("shuffle")) != (self.seed, self.shuffle):
            problems.append(f"the checkpoint shuffled with seed={state.get('seed')} shuffle={state.get('shuffle')}, "
                            f"this run with seed={self.seed} shuffle={self.shuffle}")
        saved = (int(state["epoch"]), int(state["index"]))
        same_data = not problems
        if same_data and (global_batch_size % (old[0] * old[1])
                          or saved != step_position(step, n, old, global_batch_size)):
            raise UserError(
                f"the checkpoint's data position (micro-batch {saved[1]} of epoch {saved[0]}) is not where {step} "
                f"steps of {global_batch_size} rows on {old[0]} worker(s) end: it was trained with another "
                f"trainer.global_batch_size. Resume with scaling.num_workers={old[0]} trainer.micro_batch_size="
                f"{old[1]}, or with the global batch size the checkpoint was trained with")
        problems += layout_problems(n, old, new, global_batch_size)
        if problems:
            fix = f"Resume with scaling.num_workers={old[0]}"
            if old[1] != new[1]:
                fix += f" trainer.micro_batch_size={old[1]}"
            alternatives = [w for w in range(1, global_batch_size // new[1] + 1) if same_data
                            and w not in (old[0], new[0]) and not layout_problems(n, old, (w, new[1]), global_batch_size)]
            if alternatives:
                fix += f" (or scaling.num_workers={' or '.join(map(str, alternatives))})"
            raise UserError(
                f"the data position of step {step}, saved by {old[0]} worker(s) x {old[1]}-row micro-batches, cannot "
                f"be carried over exactly to {new[0]} worker(s) x {new[1]}-row micro-batches: " + "; ".join(problems)
                + f". {fix}")
        epoch, index = step_position(step, n, new, global_batch_size)
        return {"epoch": epoch, "index": index}


def step_position(step: int, rows: int, layout: tuple[int, int], global_batch_size: int) -> tuple[int, int]:
    """(epoch, index) of a loader over `rows` rows with `layout` = (world size, micro-batch size) after `step`
    optimizer steps of `global_batch_size` rows: the loop draws ``global_batch_size // (world * micro)`` micro-batches
    per step from `ShardedBatches.forever`, across epochs."""
    world, micro = layout
    per_epoch = math.ceil(rows // world / micro)
    return divmod(step * (global_batch_size // (world * micro)), per_epoch)


def layout_problems(rows: int, old: tuple[int, int], new: tuple[int, int], global_batch_size: int) -> list[str]:
    """Why steps of `global_batch_size` rows would group the rows differently under the (world size,
    micro-batch size) layouts `old` and `new` (see `ShardedBatches.convert_position`); empty when they do not."""
    world, micro = new
    problems = []
    if global_batch_size % (world * micro):
        problems.append(f"{global_batch_size} rows per step is not a multiple of {world} worker(s) x {micro} row(s)")
    used_old, used_new = old[0] * (rows // old[0]), world * (rows // world)
    if used_old != used_new:
        problems.append(f"an epoch trains on {used_old} of the {rows} rows on {old[0]} worker(s) but on {used_new} "
                        f"on {world} (every worker keeps rows // workers of them)")
    partial = [f"{rows // w} rows per worker on {w} worker(s) is not a multiple of the micro-batch size {b}"
               for w, b in (old, new) if (rows // w) % b]
    if old[0] * old[1] != world * micro and partial:
        problems.append("steps would cut the epochs at other rows (" + ", ".join(partial) + ", so the last "
                        "micro-batch of an epoch is short)")
    return problems
