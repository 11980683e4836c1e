"""Packed rows isolate their examples under every attention backend that runs on CPU.

A packed row holds several examples whose position_ids restart at 0 and no attention_mask (distft.data.loader.collate);
transformers builds the block-diagonal causal mask from the position_ids. If a backend ignored them, an example would
attend to the ones before it in the row and its logits would differ from the example run alone. flash_attention_2
needs CUDA; config validation refuses it with packing and more than one row per micro-batch (GPU_REVIEW #6).
"""

import pytest
import torch

from distft.data.loader import collate
from distft.data.packing import pack_examples
from distft.loss import model_inputs
from tests.conftest import tiny_llama_model

PAD = 0


def _examples(lengths: list[int], seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        out.append((ids, ids))
    return out


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return list(zip(starts, [*starts[1:], len(position_ids)], strict=True))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("lengths,seq_len,rows", [([5, 11, 7], 24, 1), ([5, 11, 7, 9, 4, 13], 26, 2)])
def test_each_example_in_a_packed_micro_batch_has_the_logits_it_has_alone(attn, lengths, seq_len, rows):
    model = tiny_llama_model(attn=attn, max_position_embeddings=64, pad_token_id=PAD).eval()
    assert model.config._attn_implementation == attn
    examples = _examples(lengths)
    packed = pack_examples(examples, seq_len=seq_len, pad_id=PAD)
    assert len(packed) == rows
    batch = collate(packed, PAD)  # what the loop's micro-batch is
    assert "attention_mask" not in batch and batch["input_ids"].shape == (rows, seq_len)
    with torch.no_grad():
        logits = model(**model_inputs(batch, torch.device("cpu"))).logits
        alone = {tuple(ids): model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids, _ in examples}
    checked = 0
    for b in range(rows):
        for start, end in _segments(batch["position_ids"][b]):
            ids = tuple(batch["input_ids"][b, start:end].tolist())
            if ids not in alone:  # the row's padding tail
                assert set(ids) == {PAD}
                continue
            torch.testing.assert_close(logits[b, start:end], alone[ids], rtol=0, atol=1e-5)
            checked += 1
    assert checked == len(examples)
