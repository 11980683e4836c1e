"""The streaming export writer (distft.export_shards) in one process: the files, names and index are exactly what
`save_pretrained` writes, plain transformers/peft reload them, the tensor-wise check catches a wrong tensor, and the
export check's mode is chosen and reported as the summary expects."""

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distft.export import choose_export_check, export_and_verify, verify_export_tensors
from distft.export_shards import (
    ShardedWriter,
    check_export_tensors,
    export_plan,
    local_tensors,
    write_export,
)
from distft.strategy.ddp import DDPStrategy
from tests.conftest import tiny_llama_model
from tests.export_helpers import weights as _weights


class _NoTokenizer:
    def save_pretrained(self, out_dir):
        pass


def _model(tied: bool = False):
    model = tiny_llama_model(tied=tied, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.config.use_cache = False
    return model


def _export(model, out: Path, *, precision: str = "fp32", **kwargs):
    plan = export_plan(model, precision=precision)
    write_export(out, model, plan, local_tensors(model, plan, rank=0), rank=0, **kwargs)
    return plan


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _assert_same_weights(actual: Path, expected: Path) -> None:
    a, e = _weights(actual), _weights(expected)
    assert a.keys() == e.keys()
    for name in e:
        assert a[name].dtype == e[name].dtype and torch.equal(a[name], e[name]), name


def _json(path: Path) -> dict:
    """A JSON file, with peft's target_modules (a set, written in hash order) sorted."""
    content = json.loads(path.read_text())
    if isinstance(content.get("target_modules"), list):
        content["target_modules"] = sorted(content["target_modules"])
    return content


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_shards_and_index_are_exactly_those_save_pretrained_writes(tmp_path, tied):
    model = _model(tied)
    ref, out = tmp_path / "ref", tmp_path / "out"
    model.config.use_cache = True  # as the strategies' exports did around save_pretrained: on for users
    model.save_pretrained(ref, max_shard_size="20KB", safe_serialization=True)  # 96 x 32 fp32 embeddings: 12 KB
    model.config.use_cache = False
    _export(model, out, max_shard_size="20KB")
    shards = sorted(p for p in _files(out) if p.startswith("model-"))
    assert len(shards) > 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert _files(out) == _files(ref)
    index = "model.safetensors.index.json"
    assert (out / index).read_text() == (ref / index).read_text()  # same split, totals and formatting
    assert set(_json(out / index)) == {"metadata", "weight_map"}
    assert set(_json(out / index)["metadata"]) == {"total_size", "total_parameters"}
    _assert_same_weights(out, ref)
    assert ("lm_head.weight" in _weights(out)) is not tied  # a tied copy is written once, as transformers does
    for name in ("config.json", "generation_config.json"):
        assert _json(out / name) == _json(ref / name), name


def test_a_model_that_fits_one_shard_is_one_file_that_plain_transformers_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model()
    _export(model, tmp_path)
    assert _files(tmp_path) == {"model.safetensors", "config.json", "generation_config.json"}
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert reloaded.config.use_cache  # the export turns the KV cache back on for users


def test_bf16_training_exports_bf16_weights_and_says_so_in_the_config(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model()
    plan = _export(model, tmp_path, precision="bf16")
    assert {t.dtype for t in plan.tensors} == {torch.bfloat16}
    weights = _weights(tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert torch.equal(weights["model.norm.weight"], model.model.norm.weight.detach().bfloat16())
    assert _json(tmp_path / "config.json")["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert 2 * plan.nbytes == sum(p.numel() * 4 for p in model.parameters())  # half of the fp32 weights


def _lora(base_dir: Path):
    from transformers import AutoModelForCausalLM

    from distft.methods import apply_method

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = apply_method(base, name="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["all-linear"])
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero: give the adapter something to carry
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def test_adapter_export_is_what_peft_writes_and_peft_reloads_it(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _model().save_pretrained(tmp_path / "base")
    model = _lora(tmp_path / "base")
    ref, out = tmp_path / "ref", tmp_path / "out"
    model.save_pretrained(ref, safe_serialization=True)
    plan = _export(model, out)
    assert plan.adapter and all(".default." not in t.name for t in plan.tensors)
    assert _files(out) == _files(ref) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    _assert_same_weights(out, ref)
    assert _json(out / "adapter_config.json") == _json(ref / "adapter_config.json")
    written = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert written == sorted(written)  # the same bytes from every process (peft writes a set in hash order)
    assert not model.peft_config["default"].inference_mode  # the export wrote inference_mode without changing it
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out)
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_tensor_check_passes_on_the_export_and_names_a_tensor_that_differs(tmp_path):
    model = _model()
    plan = _export(model, tmp_path, max_shard_size="20KB")
    info = check_export_tensors(tmp_path, local_tensors(model, plan, rank=0), rank=0)
    assert info == {"check": "tensors", "tensors": len(plan.tensors), "max_abs_tensor_diff": 0.0, "mismatched": [],
                    "ok": True}
    assert check_export_tensors(tmp_path, iter(()), rank=1) is None  # other ranks only drain their gathers

    with torch.no_grad():  # the trained model moved on: the export no longer holds its tensors
        model.model.norm.weight[3] += 0.5
    info = check_export_tensors(tmp_path, local_tensors(model, plan, rank=0), rank=0)
    assert not info["ok"] and info["max_abs_tensor_diff"] == pytest.approx(0.5)
    assert [m.split(":")[0] for m in info["mismatched"]] == ["model.norm.weight"]
    with torch.no_grad():
        model.model.norm.weight[3] -= 0.5

    # a flipped byte inside one shard file
    file = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    raw = bytearray((tmp_path / file).read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / file).write_bytes(bytes(raw))
    info = check_export_tensors(tmp_path, local_tensors(model, plan, rank=0), rank=0)
    assert not info["ok"] and len(info["mismatched"]) == 1


def test_a_failed_export_leaves_no_partial_files(tmp_path):
    model = _model()
    plan = export_plan(model)

    def broken():
        for i, pair in enumerate(local_tensors(model, plan, rank=0)):
            if i == 3:
                raise OSError("disk full")
            yield pair

    with pytest.raises(OSError, match="disk full"):
        write_export(tmp_path, model, plan, broken(), rank=0, max_shard_size="20KB")
    assert _files(tmp_path) == set()
    with pytest.raises(RuntimeError, match="never arrived"), ShardedWriter(tmp_path, plan.tensors) as writer:
        writer.write(plan.tensors[0], model.model.embed_tokens.weight.detach())
    assert _files(tmp_path) == set()
    with pytest.raises(ValueError, match="planned"), ShardedWriter(tmp_path, plan.tensors) as writer:
        writer.write(plan.tensors[0], torch.zeros(2, 2))


def test_writing_and_checking_hold_one_tensor_at_a_time(tmp_path):
    """The writer and the check release each tensor before the iterator produces (gathers) the next one."""
    model = _model()
    plan = export_plan(model)
    alive_at_each_gather = []

    def fresh_tensors():
        handed = []
        for item in plan.tensors:
            alive_at_each_gather.append(sum(ref() is not None for ref in handed))
            tensor = torch.randn(item.shape).to(item.dtype)
            handed.append(weakref.ref(tensor))
            yield item, tensor
            del tensor

    write_export(tmp_path, model, plan, fresh_tensors(), rank=0, max_shard_size="20KB")
    assert len(alive_at_each_gather) == len(plan.tensors) and max(alive_at_each_gather) == 0
    alive_at_each_gather.clear()
    assert not check_export_tensors(tmp_path, fresh_tensors(), rank=0)["ok"]  # other random values
    assert max(alive_at_each_gather) == 0


def test_export_check_mode_follows_the_config_and_the_memory_at_hand():
    assert choose_export_check("logits", reload_bytes=10**12, free_bytes=10**9) == "logits"
    assert choose_export_check("tensors", reload_bytes=1, free_bytes=10**9) == "tensors"
    assert choose_export_check("auto", reload_bytes=4 * 10**8, free_bytes=10**9) == "logits"
    assert choose_export_check("auto", reload_bytes=6 * 10**8, free_bytes=10**9) == "tensors"
    assert choose_export_check("auto", reload_bytes=10**12, free_bytes=None) == "logits"
    with pytest.raises(ValueError, match="run.export_check=fast: choose one of auto, logits, tensors"):
        choose_export_check("fast", reload_bytes=1, free_bytes=1)


def _ddp(model) -> DDPStrategy:
    strategy = DDPStrategy(device=torch.device("cpu"))
    strategy.prepare(model, lambda params: torch.optim.AdamW(params, lr=1e-2),
                     lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    return strategy


@pytest.mark.parametrize("check", ["logits", "tensors"])
def test_export_and_verify_reports_which_check_ran(tmp_path, check):
    strategy = _ddp(_model())
    probe = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    info = export_and_verify(strategy, _NoTokenizer(), export_dir=tmp_path / "export", probe=probe, rank=0,
                             device=torch.device("cpu"), method="full", dtype="fp32", quant_config=None,
                             precision="fp32", run_dir=tmp_path, check=check)
    assert info["check"] == check and info["ok"] and (tmp_path / "export_probe.pt").exists()
    if check == "logits":  # the keys the summary and the GPU check read
        assert info["max_abs_logit_diff"] == 0.0 and info["tolerance"] > 0
    else:
        assert info["tensors"] == len(export_plan(strategy.unwrap()).tensors)


def test_ddp_export_and_its_tensor_check(tmp_path):
    _model().save_pretrained(tmp_path / "base")
    strategy = _ddp(_lora(tmp_path / "base"))
    strategy.export(tmp_path / "lora", _NoTokenizer(), rank=0)
    strategy.unwrap().save_pretrained(tmp_path / "ref")
    _assert_same_weights(tmp_path / "lora", tmp_path / "ref")
    assert verify_export_tensors(strategy, tmp_path / "lora", rank=0)["ok"]
    strategy.export(tmp_path / "nothing", _NoTokenizer(), rank=1)  # only rank 0 writes
    assert not (tmp_path / "nothing").exists()
    with torch.no_grad():
        next(p for n, p in strategy.unwrap().named_parameters() if "lora_A" in n).add_(1.0)
    with pytest.raises(RuntimeError, match="export check failed: .*lora_A"):
        verify_export_tensors(strategy, tmp_path / "lora", rank=0)


def test_a_model_whose_weights_transformers_converts_on_save_is_written_by_save_pretrained(tmp_path, monkeypatch):
    """Fused MoE experts and similar: the gathered tensors go to save_pretrained (which converts them), and the
    check reloads the export, since the files no longer carry the model's own names."""
    import distft.export_shards as export_shards

    monkeypatch.setattr(export_shards, "_converted_on_save", lambda model, tensors: True)
    strategy = _ddp(_model())
    probe = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    info = export_and_verify(strategy, _NoTokenizer(), export_dir=tmp_path / "export", probe=probe, rank=0,
                             device=torch.device("cpu"), method="full", dtype="fp32", quant_config=None,
                             precision="fp32", run_dir=tmp_path, check="tensors")
    assert info["check"] == "logits" and info["ok"] and info["max_abs_logit_diff"] == 0.0
    strategy.unwrap().save_pretrained(tmp_path / "ref")
    _assert_same_weights(tmp_path / "export", tmp_path / "ref")
