"""Prompt templates and loss masking, checked token by token with the real SmolLM2 tokenizer."""

from __future__ import annotations

import copy
import time

import pytest

from distft.data.format import IGNORE_INDEX, encode_example, encode_examples, format_prompt
from distft.data.sources import Example, load_examples
from distft.errors import ConfigError
from tests.conftest import GSM8K_DIR


@pytest.fixture(scope="session")
def chat_tokenizer(embedded_tokenizer):
    return embedded_tokenizer


@pytest.fixture(scope="session")
def plain_tokenizer(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = None
    return tok


EXAMPLE = Example(
    messages=({"role": "system", "content": "You solve math."}, {"role": "user", "content": "What is 2+3?"}),
    response="2+3=<<2+3=5>>5\n#### 5",
    origin="t:1",
)
MULTI_TURN = (
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+3?"},
)


def test_plain_prompt_text_is_exact(plain_tokenizer):
    assert format_prompt(plain_tokenizer, EXAMPLE.messages, "plain") == (
        "You solve math.\n\nQuestion: What is 2+3?\nAnswer:"
    )
    assert format_prompt(plain_tokenizer, MULTI_TURN, "plain") == (
        "Question: Hi\nAnswer: Hello.\n\nQuestion: What is 2+3?\nAnswer:"
    )


def test_chat_prompt_ends_with_generation_prompt(chat_tokenizer):
    text = format_prompt(chat_tokenizer, EXAMPLE.messages, "chat")
    assert text == (
        "<|im_start|>system\nYou solve math.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_auto_picks_chat_template_when_present(chat_tokenizer, plain_tokenizer):
    msgs = EXAMPLE.messages
    assert format_prompt(chat_tokenizer, msgs, "auto") == format_prompt(chat_tokenizer, msgs, "chat")
    assert format_prompt(plain_tokenizer, msgs, "auto") == format_prompt(plain_tokenizer, msgs, "plain")


def test_chat_without_template_and_unknown_template_are_config_errors(plain_tokenizer):
    with pytest.raises(ConfigError, match="no chat template"):
        format_prompt(plain_tokenizer, EXAMPLE.messages, "chat")
    with pytest.raises(ConfigError, match="unknown template"):
        format_prompt(plain_tokenizer, EXAMPLE.messages, "alpaca")


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_labels_mask_prompt_exactly_and_cover_answer_plus_eos(chat_tokenizer, template):
    tok = chat_tokenizer
    input_ids, labels = encode_example(tok, EXAMPLE, template, max_seq_len=512)
    prompt_text = format_prompt(tok, EXAMPLE.messages, template)
    prompt_ids = tok(prompt_text, add_special_tokens=template == "plain")["input_ids"]
    n = len(prompt_ids)
    assert len(input_ids) == len(labels)
    assert input_ids[:n] == prompt_ids
    for t in range(len(input_ids)):  # token by token: -100 exactly over the prompt, the token itself after
        if t < n:
            assert labels[t] == IGNORE_INDEX, t
        else:
            assert labels[t] == input_ids[t], t
    assert input_ids[-1] == tok.eos_token_id
    answer = tok.decode([x for x in labels if x != IGNORE_INDEX][:-1])
    expected = " " + EXAMPLE.response if template == "plain" else EXAMPLE.response
    assert answer == expected
    assert tok.decode(input_ids[:n]) == prompt_text


def test_chat_prompt_adds_no_second_bos(chat_tokenizer):
    # SmolLM2 declares bos = <|im_start|>; the chat prompt must start with exactly one.
    input_ids, _ = encode_example(chat_tokenizer, EXAMPLE, "chat", 512)
    bos = chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert input_ids[0] == bos and input_ids[1] != bos


def test_too_long_example_is_dropped(chat_tokenizer):
    ids, _ = encode_example(chat_tokenizer, EXAMPLE, "chat", 512)
    assert encode_example(chat_tokenizer, EXAMPLE, "chat", len(ids)) is not None
    assert encode_example(chat_tokenizer, EXAMPLE, "chat", len(ids) - 1) is None


def test_batch_encoding_matches_single_and_counts_drops(chat_tokenizer):
    examples = [
        Example(
            ({"role": "user", "content": f"What is {i}+{i}?" + " Think." * (i * 20)},),
            f"#### {2 * i}",
            f"t:{i}",
        )
        for i in range(6)
    ]
    singles = [encode_example(chat_tokenizer, ex, "chat", 100) for ex in examples]
    encoded, dropped = encode_examples(chat_tokenizer, examples, "chat", 100)
    assert encoded == [s for s in singles if s is not None]
    assert dropped == sum(s is None for s in singles) > 0
    assert encode_examples(chat_tokenizer, [], "chat", 100) == ([], 0)


@pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").is_file(), reason="GSM8K not present")
def test_gsm8k_train_encodes_in_seconds(chat_tokenizer):
    examples = load_examples("gsm8k", str(GSM8K_DIR), "train")
    start = time.perf_counter()
    encoded, dropped = encode_examples(chat_tokenizer, examples, "chat", 512)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"encoding 7473 examples took {elapsed:.1f}s; it must batch-tokenize"
    assert len(encoded) + dropped == 7473 and dropped < 20
    # spot-check the masking on a real row
    ids, labels = encoded[0]
    assert chat_tokenizer.decode([x for x in labels if x != IGNORE_INDEX][:-1]) == examples[0].response


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A tiny word-level tokenizer whose special tokens add a BOS, and whose chat template writes its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "Question:", "Answer:", "hi", "there", "[U]", "[A]"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}<s> [U] {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}[A]{% endif %}"
    return tok


def test_plain_adds_bos_and_chat_relies_on_the_template(bos_tokenizer):
    ex = Example(({"role": "user", "content": "hi"},), "there", "t:1")
    plain_ids, plain_labels = encode_example(bos_tokenizer, ex, "plain", 64)
    assert plain_ids == [1, 3, 5, 4, 6, 2]  # <s> Question: hi Answer: there </s>
    assert plain_labels == [IGNORE_INDEX] * 4 + [6, 2]
    chat_ids, chat_labels = encode_example(bos_tokenizer, ex, "chat", 64)
    assert chat_ids == [1, 7, 5, 8, 6, 2]  # exactly one <s>, from the template
    assert chat_labels == [IGNORE_INDEX] * 4 + [6, 2]
