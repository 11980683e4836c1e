"""Prompt templates and tokenization with loss masking.

An encoded example is ``prompt_ids + response_ids + [eos]``; its labels are ``-100`` over the prompt so
the loss covers only the answer and the end-of-sequence token. The prompt is tokenized on its own,
exactly as it will be at generation time, so training and inference see the same prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from distft.data.sources import Example
from distft.errors import ConfigError

IGNORE_INDEX = -100
TEMPLATES = ("auto", "chat", "plain")

Encoded = tuple[list[int], list[int]]


def resolve_template(tokenizer, template: str) -> str:
    """Return ``"chat"`` or ``"plain"``: ``"auto"`` picks chat when the tokenizer has a chat template."""
    if template not in TEMPLATES:
        raise ConfigError([f"data.template={template!r}: unknown template; valid: {', '.join(TEMPLATES)}"])
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise ConfigError(
            ["data.template=chat: the tokenizer has no chat template (use data.template=plain or auto)"]
        )
    return template


def format_prompt(tokenizer, messages: Sequence[dict], template: str) -> str:
    """Render the text the model sees before the answer, ending with the generation prompt.

    ``chat`` uses the tokenizer's chat template with ``add_generation_prompt=True``. ``plain`` is::

        {system}\\n\\n                       (only if there is a system message)
        Question: {user}\\nAnswer: {assistant}\\n\\n   (earlier turns)
        Question: {user}\\nAnswer:

    and the response follows after a single space (see ``encode_example``).
    """
    if resolve_template(tokenizer, template) == "chat":
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return _plain_prompt(messages)


def stop_strings(template: str) -> tuple[str, ...]:
    """Where a generated answer ends besides EOS. Under the plain template a model that has not learned EOS (the
    base model, n-shot) goes on with the next ``Question:`` turn; lm-evaluation-harness's gsm8k task stops there too
    (its ``until``), so the text after it is neither scored nor kept. ``template`` is resolved (chat or plain)."""
    return ("Question:",) if template == "plain" else ()


def _plain_prompt(messages: Sequence[dict]) -> str:
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(f"{m['content']}\n\n")
        elif m["role"] == "user":
            parts.append(f"Question: {m['content']}\nAnswer:")
        else:
            parts.append(f" {m['content']}\n\n")
    return "".join(parts)


def _response_text(response: str, template: str) -> str:
    """The plain template separates ``Answer:`` from the answer with one space."""
    return f" {response}" if template == "plain" else response


def eos_token_id(tokenizer) -> int:
    """The id appended after every answer, so the model learns to stop."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(["the tokenizer has no eos_token; set one on the model/tokenizer before training"])
    return int(eos)


def _assemble(prompt_ids: list[int], response_ids: list[int], eos: int, max_seq_len: int) -> Encoded | None:
    input_ids = [*prompt_ids, *response_ids, eos]
    if len(input_ids) > max_seq_len:
        return None
    labels = [IGNORE_INDEX] * len(prompt_ids) + [*response_ids, eos]
    return input_ids, labels


def encode_example(tokenizer, example: Example, template: str, max_seq_len: int) -> Encoded | None:
    """Tokenize one example into ``(input_ids, labels)``; None if longer than ``max_seq_len`` tokens.

    The plain template adds the tokenizer's special tokens (BOS, if it has one) to the prompt; the chat
    template already carries its own, so none are added.
    """
    encoded, _ = encode_examples(tokenizer, [example], template, max_seq_len)
    return encoded[0] if encoded else None


def encode_examples(
    tokenizer, examples: Sequence[Example], template: str, max_seq_len: int
) -> tuple[list[Encoded], int]:
    """Batch-tokenize examples; returns ``(encoded, n_dropped)`` where dropped ones exceed ``max_seq_len``.

    Order is kept (minus drops). Uses one fast-tokenizer call for all prompts and one for all answers.
    """
    template = resolve_template(tokenizer, template)
    eos = eos_token_id(tokenizer)
    if not examples:
        return [], 0
    prompts = [format_prompt(tokenizer, ex.messages, template) for ex in examples]
    responses = [_response_text(ex.response, template) for ex in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=template == "plain")["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    encoded = []
    for p, r in zip(prompt_ids, response_ids, strict=True):
        item = _assemble(list(p), list(r), eos, max_seq_len)
        if item is not None:
            encoded.append(item)
    return encoded, len(examples) - len(encoded)
