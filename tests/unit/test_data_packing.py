"""Packing: layout, fill, and proof that packed examples never attend to each other."""

from __future__ import annotations

import random

import pytest
import torch

from distft.data.format import IGNORE_INDEX, encode_examples
from distft.data.packing import PackedRow, pack_examples, padding_stats, unpacked_rows
from distft.data.sources import load_examples
from tests.conftest import GSM8K_DIR, tiny_llama_model

PAD = 0


def synthetic(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Examples of the given lengths: first token unique per example, second half labelled."""
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = [1 + i] + [rng.randrange(1, vocab) for _ in range(n - 1)]
        k = max(1, n // 2)
        out.append((ids, [IGNORE_INDEX] * k + ids[k:]))
    return out


def segments(row: PackedRow) -> list[tuple[int, int]]:
    """(start, end) of each segment, split where position_ids do not step by +1 (as transformers does)."""
    starts = [
        t
        for t in range(len(row.position_ids))
        if t == 0 or row.position_ids[t] - row.position_ids[t - 1] != 1
    ]
    return list(zip(starts, [*starts[1:], len(row.position_ids)], strict=True))


def real_segments(row: PackedRow) -> list[tuple[int, int]]:
    return [(s, e) for s, e in segments(row) if any(x != IGNORE_INDEX for x in row.labels[s:e])]


# --- layout --------------------------------------------------------------------------------------------


def test_every_example_appears_once_with_restarting_positions_and_padded_tail():
    encoded = synthetic([5, 9, 13, 3, 7, 11, 20, 6, 1 + 31, 2])
    rows = pack_examples(encoded, seq_len=32, pad_id=PAD)
    seen = []
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) == 32
        segs = real_segments(row)
        for s, e in segs:
            assert row.position_ids[s:e] == list(range(e - s))
            seen.append((row.input_ids[s:e], row.labels[s:e]))
        end = segs[-1][1]
        assert row.input_ids[end:] == [PAD] * (32 - end)
        assert row.labels[end:] == [IGNORE_INDEX] * (32 - end)
        assert row.position_ids[end:] == list(range(32 - end))
    # labels are kept, except each segment's first one: nothing in its own segment predicts it
    expected = [(ids, [IGNORE_INDEX, *labels[1:]]) for ids, labels in encoded]
    assert sorted(seen) == sorted(expected)


def test_first_label_of_each_segment_is_ignored_even_if_labelled():
    # a (degenerate) example whose first token is labelled would otherwise be predicted from the
    # previous example's last token
    rows = pack_examples([([5, 6], [5, 6]), ([7, 8, 9], [IGNORE_INDEX, 8, 9])], seq_len=5, pad_id=PAD)
    assert len(rows) == 1
    assert rows[0].labels == [IGNORE_INDEX, 8, 9, IGNORE_INDEX, 6]


def test_one_token_tail_is_its_own_segment():
    [row] = pack_examples(synthetic([7]), seq_len=8, pad_id=PAD)
    assert row.position_ids == [0, 1, 2, 3, 4, 5, 6, 0]


def test_best_fit_decreasing_reaches_the_optimum_on_a_known_case():
    lengths = [6, 5, 4, 3, 2, 2, 2]  # 24 tokens -> 3 full rows of 8
    rows = pack_examples(synthetic(lengths), seq_len=8, pad_id=PAD)
    assert len(rows) == 3
    assert padding_stats(rows, 8)["non_padding_fraction"] == 1.0


def test_packing_is_deterministic_and_fills_well():
    rng = random.Random(1)
    encoded = synthetic([rng.randrange(20, 300) for _ in range(400)], seed=1)
    a = pack_examples(encoded, seq_len=512, pad_id=PAD)
    b = pack_examples([(list(i), list(lab)) for i, lab in encoded], seq_len=512, pad_id=PAD)
    assert a == b
    assert padding_stats(a, 512)["non_padding_fraction"] > 0.97


def test_example_longer_than_seq_len_is_rejected():
    with pytest.raises(ValueError, match="longer than seq_len=8"):
        pack_examples(synthetic([3, 9]), seq_len=8, pad_id=PAD)


def test_padding_stats_counts_real_and_answer_tokens():
    encoded = synthetic([4, 6, 3])  # labelled: 2 + 3 + 2 = 7
    packed = pack_examples(encoded, seq_len=8, pad_id=PAD)  # rows: [6 + pad 2], [4 + 3 + pad 1]
    assert padding_stats(packed, 8) == {
        "rows": 2,
        "tokens": 16,
        "non_padding_tokens": 13,
        "non_padding_fraction": 13 / 16,
        "answer_tokens": 7,
    }
    unpacked = unpacked_rows(encoded)
    assert [len(r.input_ids) for r in unpacked] == [4, 6, 3]
    assert [r.position_ids for r in unpacked][2] == [0, 1, 2]
    assert padding_stats(unpacked, 8)["non_padding_fraction"] == 13 / 24


# --- no cross-contamination through attention -----------------------------------------------------------


def tiny_llama(attn: str):
    model = tiny_llama_model(vocab_size=256, hidden_size=64, intermediate_size=128, attn=attn)
    assert model.config._attn_implementation == attn
    return model.eval()


def as_batch(rows: list[PackedRow]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([getattr(r, k) for r in rows]) for k in ("input_ids", "labels", "position_ids")}


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over labelled tokens (the shift the training loop uses)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


PACK_LENGTHS = [5, 9, 13, 3, 7, 11, 20, 6, 17, 4, 2, 15]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_run_alone(attn):
    model = tiny_llama(attn)
    encoded = synthetic(PACK_LENGTHS)
    rows = pack_examples(encoded, seq_len=32, pad_id=PAD)
    assert all(len(real_segments(r)) >= 2 for r in rows[1:])  # rows really hold several examples
    batch = as_batch(rows)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=None,
            use_cache=False,
        ).logits
        checked = 0
        for b, row in enumerate(rows):
            for s, e in real_segments(row):
                alone = model(input_ids=torch.tensor([row.input_ids[s:e]]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[b, s:e], alone, atol=1e-5, rtol=0)
                checked += 1
        assert checked == len(PACK_LENGTHS)

        # the training loss over packed rows is the sum of the examples' own losses
        solo = [
            summed_loss(model(input_ids=torch.tensor([ids]), use_cache=False).logits, torch.tensor([lab]))
            for ids, lab in encoded
        ]
        torch.testing.assert_close(
            summed_loss(packed, batch["labels"]), torch.stack(solo).sum(), atol=1e-4, rtol=1e-5
        )


def test_negative_control_without_position_restarts_examples_leak():
    """The check above can fail: with one running position count the later examples see earlier ones."""
    model = tiny_llama("sdpa")
    rows = pack_examples(synthetic(PACK_LENGTHS), seq_len=32, pad_id=PAD)
    row = rows[1]
    s, e = real_segments(row)[1]
    with torch.no_grad():
        leaked = model(
            input_ids=torch.tensor([row.input_ids]),
            position_ids=torch.arange(32)[None],
            attention_mask=None,
            use_cache=False,
        ).logits[0, s:e]
        alone = model(input_ids=torch.tensor([row.input_ids[s:e]]), use_cache=False).logits[0]
    assert (leaked - alone).abs().max() > 1e-2


@pytest.mark.parametrize("call", ["use_cache_default", "attention_mask_ones"])
def test_gotchas_that_silently_disable_packed_masking(call):
    """Transformers only detects packing with attention_mask=None AND no cache. Both mistakes below make
    examples attend to each other without any warning, so the training loop must pass exactly
    ``attention_mask=None, use_cache=False`` for packed batches. (If a transformers upgrade makes this
    test fail, the gotcha is gone.)"""
    model = tiny_llama("sdpa").train()  # use_cache defaults to config.use_cache=True even in train mode
    rows = pack_examples(synthetic(PACK_LENGTHS), seq_len=32, pad_id=PAD)
    row = rows[1]
    s, e = real_segments(row)[1]
    ids, pos = torch.tensor([row.input_ids]), torch.tensor([row.position_ids])
    kwargs = (
        {} if call == "use_cache_default" else {"attention_mask": torch.ones_like(ids), "use_cache": False}
    )
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, **kwargs).logits[0, s:e]
        alone = model(input_ids=ids[:, s:e], use_cache=False).logits[0]
    assert (out - alone).abs().max() > 1e-2


# --- fill on real GSM8K ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer(embedded_tokenizer):
    return embedded_tokenizer


@pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").is_file(), reason="GSM8K not present")
def test_gsm8k_train_packs_to_at_least_95_percent_fill(chat_tokenizer):
    examples = load_examples("gsm8k", str(GSM8K_DIR), "train")
    encoded, dropped = encode_examples(chat_tokenizer, examples, "chat", 512)
    packed = padding_stats(pack_examples(encoded, 512, chat_tokenizer.pad_token_id), 512)
    padded = padding_stats(unpacked_rows(encoded), 512)
    assert packed["non_padding_fraction"] >= 0.95, packed
    assert padded["non_padding_fraction"] < 0.5, padded
    assert packed["non_padding_tokens"] == padded["non_padding_tokens"]
    assert packed["answer_tokens"] == padded["answer_tokens"] > 0
    assert packed["rows"] < padded["rows"] / 2
