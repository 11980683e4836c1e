"""Data pipeline: load and validate examples, format and mask, pack, shard into micro-batches.

``build_rows`` runs the first three steps; ``ShardedBatches`` turns the rows into one rank's batches.
"""

from __future__ import annotations

import logging
import math

from distft.data.format import (
    IGNORE_INDEX,
    encode_example,
    encode_examples,
    eos_token_id,
    format_prompt,
    resolve_template,
    stop_strings,
)
from distft.data.loader import ShardedBatches, collate
from distft.data.packing import PackedRow, pack_examples, padding_stats, unpacked_rows
from distft.data.sources import Example, load_examples, with_fewshot
from distft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "PackedRow",
    "ShardedBatches",
    "build_rows",
    "collate",
    "encode_example",
    "encode_examples",
    "eos_token_id",
    "format_prompt",
    "load_examples",
    "pack_examples",
    "pad_token_id",
    "padding_stats",
    "resolve_template",
    "steps_per_epoch",
    "stop_strings",
    "unpacked_rows",
    "with_fewshot",
]


def pad_token_id(tokenizer) -> int:
    """The id used to pad rows: the tokenizer's pad token, else its eos token (padding is never trained on)."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else eos_token_id(tokenizer)


def steps_per_epoch(rows: int, *, micro_batch_size: int, world: int, grad_accum: int, global_batch_size: int) -> int:
    """Optimizer steps in one epoch of `rows` rows (each rank keeps rows // world of them, see ShardedBatches).

    Raises:
        DataError: Not even one step can be filled.
    """
    per_rank = rows // world
    steps = math.ceil(per_rank / micro_batch_size) // grad_accum
    if steps == 0:
        raise DataError(
            f"{rows} training rows cannot fill one step of trainer.global_batch_size={global_batch_size} over "
            f"scaling.num_workers={world}; lower trainer.global_batch_size or add data (data.max_train_examples)"
        )
    return steps


def build_rows(
    *,
    name: str,
    path: str | None,
    split: str,
    tokenizer,
    template: str,
    seq_len: int,
    packing: bool,
    limit: int | None = None,
    hub_id: str = "openai/gsm8k",
    system_prompt: str | None = None,
) -> tuple[list[PackedRow], dict]:
    """Load, validate, tokenize and (optionally) pack one split.

    Examples longer than ``seq_len`` tokens are dropped and counted. Returns the rows and stats:
    ``examples`` (loaded), ``dropped_too_long``, ``rows``, ``non_padding_fraction`` (of
    ``rows * seq_len`` slots; for ``packing=False`` relative to padding every row to ``seq_len``, an
    upper bound on the padding the collator adds) and ``answer_tokens``.

    Raises:
        DataError: The data is invalid, or every example is longer than ``seq_len``.
    """
    examples = load_examples(name, path, split, hub_id=hub_id, limit=limit, system_prompt=system_prompt)
    encoded, dropped = encode_examples(tokenizer, examples, template, seq_len)
    if dropped:
        logger.warning(
            "%s/%s: dropped %d of %d examples longer than data.seq_len=%d tokens",
            name,
            split,
            dropped,
            len(examples),
            seq_len,
        )
    if not encoded:
        raise DataError(
            f"{name}/{split}: all {len(examples)} examples are longer than data.seq_len={seq_len} tokens "
            f"(raise data.seq_len)"
        )
    rows = pack_examples(encoded, seq_len, pad_token_id(tokenizer)) if packing else unpacked_rows(encoded)
    pad = padding_stats(rows, seq_len)
    stats = {
        "examples": len(examples),
        "dropped_too_long": dropped,
        "rows": len(rows),
        "non_padding_fraction": pad["non_padding_fraction"],
        "answer_tokens": pad["answer_tokens"],
    }
    logger.info("%s/%s: %s", name, split, stats)
    return rows, stats
