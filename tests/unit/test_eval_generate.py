"""Batched greedy generation: left padding must not change what a prompt generates."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from distft.eval import greedy_generate
from tests.conftest import EMBEDDED_GGUF, embedded_gguf_dir, tiny_llama_model

# Prompts of clearly different token lengths, so batches need real padding.
PROMPTS = [
    "Hello",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "What is 2 + 2?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
    "Hi there, friend",
]


@pytest.fixture(scope="session")
def smollm2_tokenizer(embedded_tokenizer):
    return embedded_tokenizer


@pytest.fixture
def tiny_llama(smollm2_tokenizer):
    # A wider init than the default 0.02 gives peaked logits, so greedy picks have clear margins
    # and tiny float differences between padded and unpadded runs cannot flip an argmax.
    return tiny_llama_model(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                            initializer_range=0.5, bos_token_id=smollm2_tokenizer.bos_token_id,
                            eos_token_id=smollm2_tokenizer.eos_token_id,
                            pad_token_id=smollm2_tokenizer.pad_token_id).float()


def _one_by_one(model, tokenizer, prompts, max_new_tokens):
    return [
        greedy_generate(model, tokenizer, [p], max_new_tokens=max_new_tokens, batch_size=1)[0]
        for p in prompts
    ]


def test_batched_equals_one_by_one_and_keeps_order(tiny_llama, smollm2_tokenizer):
    lengths = [len(smollm2_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS), "prompts should differ in length"

    expected = _one_by_one(tiny_llama, smollm2_tokenizer, PROMPTS, max_new_tokens=8)
    assert all(expected), "each prompt should generate some text"
    assert len(set(expected)) > 1, "different prompts should give different completions"
    for batch_size in (2, 3, len(PROMPTS)):
        got = greedy_generate(tiny_llama, smollm2_tokenizer, PROMPTS, max_new_tokens=8, batch_size=batch_size)
        assert got == expected, f"batch_size={batch_size}"


def test_returns_only_new_text(tiny_llama, smollm2_tokenizer):
    prompt = PROMPTS[1]
    [completion] = greedy_generate(tiny_llama, smollm2_tokenizer, [prompt], max_new_tokens=5, batch_size=1)
    ids = smollm2_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    full = tiny_llama.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=5,
        pad_token_id=smollm2_tokenizer.pad_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
    )
    assert completion == smollm2_tokenizer.decode(full[0, ids.shape[1] :], skip_special_tokens=True)
    assert prompt not in completion


def test_restores_training_mode_and_tokenizer_settings(tiny_llama, smollm2_tokenizer):
    tiny_llama.train()
    tiny_llama.model.layers[0].eval()  # a mixed state must come back exactly as it was
    before = {name: m.training for name, m in tiny_llama.named_modules()}
    padding_side = smollm2_tokenizer.padding_side
    greedy_generate(tiny_llama, smollm2_tokenizer, PROMPTS[:2], max_new_tokens=2, batch_size=2)
    assert {name: m.training for name, m in tiny_llama.named_modules()} == before
    assert smollm2_tokenizer.padding_side == padding_side

    tiny_llama.eval()
    greedy_generate(tiny_llama, smollm2_tokenizer, PROMPTS[:2], max_new_tokens=2, batch_size=2)
    assert not any(m.training for m in tiny_llama.modules())


def test_without_pad_token_pads_with_eos_and_restores(tiny_llama, smollm2_tokenizer):
    expected = greedy_generate(tiny_llama, smollm2_tokenizer, PROMPTS, max_new_tokens=4, batch_size=5)
    pad_token = smollm2_tokenizer.pad_token
    smollm2_tokenizer.pad_token = None
    try:
        got = greedy_generate(tiny_llama, smollm2_tokenizer, PROMPTS, max_new_tokens=4, batch_size=5)
        assert smollm2_tokenizer.pad_token is None
    finally:
        smollm2_tokenizer.pad_token = pad_token
    assert got == expected


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_peft_model_batched_equals_one_by_one(tiny_llama, smollm2_tokenizer):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama, config)
    model.train()
    expected = _one_by_one(model, smollm2_tokenizer, PROMPTS, max_new_tokens=6)
    got = greedy_generate(model, smollm2_tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    assert got == expected
    assert model.training


def test_empty_prompts_and_bad_batch_size(tiny_llama, smollm2_tokenizer):
    assert greedy_generate(tiny_llama, smollm2_tokenizer, [], max_new_tokens=4, batch_size=2) == []
    with pytest.raises(ValueError, match="batch_size"):
        greedy_generate(tiny_llama, smollm2_tokenizer, PROMPTS, max_new_tokens=4, batch_size=0)


@pytest.mark.slow
def test_real_smollm2_knows_the_capital_of_france(smollm2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(embedded_gguf_dir(), gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    [answer] = greedy_generate(model, smollm2_tokenizer, [prompt], max_new_tokens=24, batch_size=1)
    assert "Paris" in answer


def test_stop_strings_end_an_answer_and_are_cut_with_what_follows(tiny_llama, smollm2_tokenizer):
    from distft.data import stop_strings
    from distft.eval.generate import truncate_at

    full = greedy_generate(tiny_llama, smollm2_tokenizer, PROMPTS, max_new_tokens=16, batch_size=len(PROMPTS))
    text = full[1]
    stop = text[len(text) // 2 : len(text) // 2 + 4]  # a piece of one row's answer, after its start
    assert stop.strip() and text.find(stop) > 0
    got = greedy_generate(tiny_llama, smollm2_tokenizer, PROMPTS, max_new_tokens=16, batch_size=len(PROMPTS),
                          stop=[stop])
    assert got[1] == text[: text.find(stop)]
    # rows without the stop string are untouched; rows with it lose it and everything after it
    assert got == [truncate_at(t, [stop]) for t in full]
    assert truncate_at("7\n\nQuestion: and #### 9", stop_strings("plain")) == "7\n\n"
    assert stop_strings("plain") == ("Question:",) and stop_strings("chat") == ()
