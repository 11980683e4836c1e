"""The export's model card (Hub metadata, training, prompt, scores) and run.push_to_hub without a reachable Hub."""

import json

import pytest

from distft.export import base_model_id, push_to_hub, write_model_card
from tests.conftest import compose_cfg


@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_card_names_the_base_data_prompt_and_scores(method, tmp_path, embedded_tokenizer):
    from huggingface_hub import ModelCard

    cfg = compose_cfg([f"+experiment=gsm8k_{method}", "model=smollm2_135m", "hardware=cpu"])
    if method == "lora":
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    write_model_card(tmp_path, cfg=cfg, tokenizer=embedded_tokenizer, template="auto", steps=12, lr=2e-4,
                     train_loss=1.2345,
                     metrics={"eval_loss": 1.1, "accuracy": 0.25, "num_examples": 200, "samples": []},
                     check={"check": "logits", "ok": True})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == ("peft" if method == "lora" else "transformers")
    assert card.data.datasets == ["openai/gsm8k"] and card.data.pipeline_tag == "text-generation"
    assert {"distft", method}.issubset(card.data.tags)
    assert "| accuracy | 0.25 |" in card.text and "| eval_loss | 1.1 |" in card.text
    assert "<|im_start|>user\n{question}<|im_end|>" in card.text  # the chat template, rendered
    assert "lr 0.0002," in card.text and card.data.tags.count("lora") <= 1
    assert "12 optimizer steps" in card.text and "final train loss 1.2345" in card.text
    assert ("AutoPeftModelForCausalLM" in card.text) == (method == "lora")
    assert ("LoRA r=" in card.text) == (method == "lora")


def test_base_model_is_a_hub_id_only_when_one_is_known(tmp_path):
    assert base_model_id(compose_cfg(["model=llama2_7b"]).model) == "meta-llama/Llama-2-7b-hf"
    assert base_model_id(compose_cfg(["model=tiny_llama"]).model) is None  # random-initialised
    assert base_model_id(compose_cfg(["model=llama2_7b", f"model.path={tmp_path}"]).model) is None  # a local dir


def test_push_to_hub_offline_is_skipped_with_the_reason_and_the_command(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = push_to_hub(tmp_path, "someone/model")
    assert result["skipped"] == "HF_HUB_OFFLINE is set"
    assert result["push_later"] == f"push it later with `huggingface-cli upload someone/model {tmp_path}`"


def test_push_to_hub_that_cannot_reach_the_hub_does_not_raise(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = push_to_hub(tmp_path, "someone/model")
    assert result["repo"] == "someone/model" and result["skipped"] and "url" not in result
