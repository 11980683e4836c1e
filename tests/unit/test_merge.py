"""The streamed LoRA merge (distft.merge): the base read one tensor at a time, the result what peft's
merge_and_unload + save_pretrained writes, bit for bit; adapters that are not plain LoRA fall back to peft."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distft.merge import main, merge_adapter
from distft.model import load_tokenizer
from tests.export_helpers import SHAPE, write_checkpoints


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    return write_checkpoints(tmp_path_factory.mktemp("bases"))


def _adapter(base: str, out: Path, **lora) -> Path:
    """A LoRA adapter on every linear layer with random A and B (a trained adapter's B is not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return out


def _peft_merge(base: str, adapter: Path, out: Path, dtype: torch.dtype) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(out, safe_serialization=True)


def _tensors(directory: Path) -> dict[str, tuple[str, torch.Tensor]]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: (path.name, f.get_tensor(k)) for k in f.keys()})  # noqa: SIM118
    return out


def _assert_same_export(ours: Path, theirs: Path) -> None:
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    for key, (file, tensor) in a.items():
        assert file == b[key][0], key
        assert tensor.dtype == b[key][1].dtype and torch.equal(tensor.view(torch.uint8), b[key][1].view(torch.uint8)), key
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        assert (ours / name).exists() == (theirs / name).exists(), name
        if (ours / name).exists():
            assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name


@pytest.mark.parametrize("base_name,dtype,lora", [
    ("sharded", "fp32", {}),
    ("sharded", "bf16", {}),
    ("tied", "bf16", {"use_rslora": True}),
])
def test_streamed_merge_writes_what_peft_merge_and_save_pretrained_write(bases, tmp_path, monkeypatch, base_name,
                                                                         dtype, lora):
    base = bases[base_name]
    adapter = _adapter(base, tmp_path / "adapter", **lora)
    _peft_merge(base, adapter, tmp_path / "peft", torch.float32 if dtype == "fp32" else torch.bfloat16)

    import transformers

    def no_whole_load(*args, **kwargs):
        raise AssertionError("the streamed merge loaded the whole base model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_whole_load)
    info = merge_adapter(base, adapter, tmp_path / "ours", dtype=dtype)
    monkeypatch.undo()
    assert info["streamed"] and info["merged"] == SHAPE["num_layers"] * 7, info  # q, k, v, o, gate, up, down
    _assert_same_export(tmp_path / "ours", tmp_path / "peft")
    if base_name == "sharded":
        assert len(list((tmp_path / "ours").glob("*.safetensors"))) == 1  # 50GB shards, as save_pretrained
    assert (tmp_path / "ours" / "tokenizer_config.json").exists()


def test_adapters_that_are_not_plain_lora_and_unreadable_bases_are_merged_by_peft(bases, tmp_path, caplog):
    dora = _adapter(bases["sharded"], tmp_path / "dora", use_dora=True)
    info = merge_adapter(bases["sharded"], dora, tmp_path / "dora-merged", dtype="fp32")
    assert not info["streamed"] and "DoRA" in info["reason"]
    assert "peft merges it on the whole base model" in caplog.text
    _peft_merge(bases["sharded"], dora, tmp_path / "dora-peft", torch.float32)
    _assert_same_export(tmp_path / "dora-merged", tmp_path / "dora-peft")

    plain = _adapter(bases["bin"], tmp_path / "plain")
    info = merge_adapter(bases["bin"], plain, tmp_path / "bin-merged", dtype="fp32")
    assert not info["streamed"] and "no safetensors weights" in info["reason"]
    _peft_merge(bases["bin"], plain, tmp_path / "bin-peft", torch.float32)
    _assert_same_export(tmp_path / "bin-merged", tmp_path / "bin-peft")


def test_merge_command_reads_the_base_from_the_adapter_and_refuses_a_non_adapter(bases, tmp_path, capsys):
    adapter = _adapter(bases["sharded"], tmp_path / "adapter")
    assert main([str(adapter), str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["base"] == bases["sharded"] and printed["streamed"]
    _peft_merge(bases["sharded"], adapter, tmp_path / "peft", torch.float32)
    _assert_same_export(tmp_path / "out", tmp_path / "peft")

    assert main([bases["sharded"], str(tmp_path / "nothing")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
