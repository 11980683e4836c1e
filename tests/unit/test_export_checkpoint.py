"""Exports from sharded training and from checkpoints, without Ray.

Two spawned gloo ranks train the tiny random Llama under FSDP2 (full fine-tuning and LoRA), then write the streaming
export, today's gathered-state-dict export (`get_model_state_dict(full_state_dict=True)` + `save_pretrained`) and a
checkpoint. The exports must hold the same files and tensors, the tensor-wise check must pass on both ranks'
collective gathers, and `python -m distft.export_checkpoint` must turn the checkpoint into the same export offline.
DDP checkpoints and the converter's errors are checked in this process.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distft.checkpoint import save_checkpoint
from distft.errors import UserError
from distft.export_checkpoint import export_checkpoint, main
from tests.conftest import compose_cfg, rank_env, tiny_model_dir
from tests.export_helpers import weights as _weights
from tests.integration.conftest import spawn_two_ranks

LORA = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
METHODS = ("full", "lora")


def _write_config(run_dir: Path, method: str, strategy: str) -> None:
    """The config.yaml a run writes into its run directory (resolved)."""
    cfg = compose_cfg(["model=tiny_llama", f"method={method}", f"strategy={strategy}", "hardware=cpu",
                       *(f"method.{k}={v}" for k, v in LORA.items())])
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2)


def _scheduler(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _train(strategy, model, rank: int) -> None:
    """Two optimizer steps on rank-dependent tokens, then two eval forwards, as evaluation leaves the model before the
    export: FSDP leaves the root unsharded; ZeRO-3 prefetches along the first forward's trace in the second, which
    leaves parameters in flight."""
    from distft.loss import causal_lm_loss_sum

    strategy.prepare(model, _optimizer, _scheduler)
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        with strategy.sync_context(sync=True):
            loss = causal_lm_loss_sum(strategy.model(input_ids=ids, use_cache=False).logits, ids) / ids.numel()
            strategy.backward(loss)
        strategy.step(1.0)
    strategy.model.eval()
    with torch.no_grad():
        for _ in range(2):
            strategy.model(input_ids=ids, use_cache=False)


def _checkpoint_and_check(run: Path, strategy, rank: int, method: str, strategy_name: str, check: dict) -> None:
    """Each rank writes its part of a step-2 checkpoint into its own directory and rank 0 merges them, as Ray would;
    each rank's export check goes next to it."""
    import torch.distributed as dist

    save_checkpoint(run / f"rank{rank}", strategy=strategy, rank=rank, world_size=2, step=2, loader_state={},
                    info={"method": method, "strategy": strategy_name, "model": "tiny_llama"})
    dist.barrier()
    if rank == 0:
        for r in range(2):
            shutil.copytree(run / f"rank{r}", run / "checkpoint_000002", dirs_exist_ok=True)
    (run / f"check_rank{rank}.json").write_text(json.dumps(check))
    dist.barrier()


def _fsdp_worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    rank_env(rank, port)
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from distft.export_shards import check_export_tensors
    from distft.methods import apply_method
    from distft.model import load_model, load_tokenizer
    from distft.strategy.fsdp import FSDPStrategy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tokenizer = load_tokenizer(model_dir)
    for method in METHODS:
        run = Path(out_dir) / method
        strategy = FSDPStrategy(device=torch.device("cpu"), precision="fp32")
        torch.manual_seed(0)  # identical LoRA initialisation on both ranks, as the recipe does
        model = apply_method(load_model(model_dir), name=method, target_modules=["all-linear"], **LORA)
        _train(strategy, model, rank)

        strategy.export(run / "new", tokenizer, rank)
        check = check_export_tensors(run / "new", strategy.export_tensors(rank), rank=rank)

        # the export as it was written before: the whole state dict gathered to rank 0, then save_pretrained
        is_peft = hasattr(model, "peft_config")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=is_peft)
        state = get_model_state_dict(model, options=options)
        if rank == 0:
            config = model.get_base_model().config if is_peft else model.config
            config.use_cache = True
            model.save_pretrained(run / "old", state_dict=state, safe_serialization=True)
            config.use_cache = False
            tokenizer.save_pretrained(run / "old")
        del state

        _checkpoint_and_check(run, strategy, rank, method, "fsdp", check)
    dist.destroy_process_group()


def _zero3_worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    rank_env(rank, port)  # DS_ACCELERATOR=cpu
    import deepspeed
    import torch.distributed as dist

    from distft.export_shards import check_export_tensors
    from distft.methods import apply_method
    from distft.model import load_model, load_tokenizer
    from distft.strategy.deepspeed import DeepSpeedStrategy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tokenizer = load_tokenizer(model_dir)
    for method in METHODS:
        run = Path(out_dir) / method
        # prefetch and live-parameter limits below one layer's size, as at scale (0.35B with 5e7): the export must
        # release the parameters a forward left in flight ("Cannot partition a param in flight")
        small = {k: 10_000 for k in ("stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                                     "stage3_max_reuse_distance")}
        strategy = DeepSpeedStrategy(device=torch.device("cpu"), zero_stage=3, rank0_load=False,
                                     deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0,
                                                                      **small}})
        torch.manual_seed(0)
        model = apply_method(load_model(model_dir), name=method, target_modules=["all-linear"], **LORA)
        _train(strategy, model, rank)

        strategy.export(run / "new", tokenizer, rank)
        check = check_export_tensors(run / "new", strategy.export_tensors(rank), rank=rank)

        # the export as it was written before: every weight gathered to rank 0, then save_pretrained
        module = strategy.unwrap()
        adapter = hasattr(module, "peft_config")
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {n: p.detach().clone() for n, p in module.named_parameters(remove_duplicate=False)
                     if p.requires_grad or not adapter}
        if rank == 0:
            module.config.use_cache = True
            module.save_pretrained(run / "old", state_dict=state, safe_serialization=True)
            module.config.use_cache = False
            tokenizer.save_pretrained(run / "old")
        del state

        _checkpoint_and_check(run, strategy, rank, method, "zero3", check)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-export")
    for method in METHODS:
        _write_config(out / method, method, "fsdp")
    spawn_two_ranks(_fsdp_worker, out, "FSDP export")
    return out


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero3-export")
    for method in METHODS:
        _write_config(out / method, method, "zero3")
    spawn_two_ranks(_zero3_worker, out, "ZeRO-3 export")
    return out


def _assert_same_export(actual: Path, expected: Path) -> None:
    """Same files, same tensors (names, dtypes, values) and the same JSON metadata."""
    assert {p.name for p in actual.iterdir()} == {p.name for p in expected.iterdir()}
    a, e = _weights(actual), _weights(expected)
    assert a.keys() == e.keys() and a
    for name in e:
        assert a[name].dtype == e[name].dtype and torch.equal(a[name], e[name]), name
    for path in expected.glob("*.json"):
        assert _json(actual / path.name) == _json(path), path.name


def _json(path: Path) -> dict:
    """A JSON file, with peft's target_modules (a set it writes in hash order) sorted."""
    content = json.loads(path.read_text())
    if isinstance(content.get("target_modules"), list):
        content["target_modules"] = sorted(content["target_modules"])
    return content


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_streaming_export_equals_the_gathered_state_dict_export(fsdp_runs, method):
    run = fsdp_runs / method
    _assert_same_export(run / "new", run / "old")
    kind = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (run / "new" / kind).exists()
    check = json.loads((run / "check_rank0.json").read_text())
    assert check["ok"] and check["check"] == "tensors" and check["tensors"] == len(_weights(run / "new"))
    assert json.loads((run / "check_rank1.json").read_text()) is None  # rank 1 only took part in the gathers


@pytest.mark.parametrize("method", METHODS)
def test_converter_turns_an_fsdp_checkpoint_into_the_runs_export(fsdp_runs, method):
    run = fsdp_runs / method
    result = export_checkpoint(run / "checkpoint_000002", run / "converted")
    assert result["format"] == "fsdp" and result["kind"] == ("adapter" if method == "lora" else "full")
    _assert_same_export(run / "converted", run / "new")


@pytest.mark.parametrize("method", METHODS)
def test_zero3_export_and_converter_equal_the_gathered_export(zero3_runs, method):
    run = zero3_runs / method
    _assert_same_export(run / "new", run / "old")
    assert json.loads((run / "check_rank0.json").read_text())["ok"]
    result = export_checkpoint(run / "checkpoint_000002", run / "converted")
    assert result["format"] == "deepspeed"
    _assert_same_export(run / "converted", run / "new")


def _ddp_checkpoint(run: Path, method: str):
    """A one-process DDP run of `method` with its checkpoint_000002 and export/ (the strategy's own)."""
    from distft.methods import apply_method
    from distft.model import load_model, load_tokenizer
    from distft.strategy.ddp import DDPStrategy

    _write_config(run, method, "ddp")
    model_dir = tiny_model_dir()
    torch.manual_seed(0)
    model = apply_method(load_model(model_dir), name=method, target_modules=["all-linear"], **LORA)
    strategy = DDPStrategy(device=torch.device("cpu"))
    _train(strategy, model, rank=0)
    strategy.export(run / "export", load_tokenizer(model_dir), rank=0)
    save_checkpoint(run / "checkpoint_000002", strategy=strategy, rank=0, world_size=1, step=2, loader_state={},
                    info={"method": method, "strategy": "ddp", "model": "tiny_llama"})
    return run / "checkpoint_000002"


@pytest.mark.parametrize("method", METHODS)
def test_converter_turns_a_ddp_checkpoint_into_the_runs_export(tmp_path, method, capsys):
    from transformers import AutoModelForCausalLM

    ckpt = _ddp_checkpoint(tmp_path / "run", method)
    assert main([str(ckpt), str(tmp_path / "converted"), "--max-shard-size", "200KB"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "ddp"
    converted = tmp_path / "converted"
    if method == "full":  # sharded here, one file in the export: compare the tensors, then reload it
        assert (converted / "model.safetensors.index.json").exists()
        expected = _weights(tmp_path / "run" / "export")
        assert _weights(converted).keys() == expected.keys()
        assert all(torch.equal(_weights(converted)[k], v) for k, v in expected.items())
        reloaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
        assert torch.equal(reloaded.model.norm.weight, expected["model.norm.weight"])
    else:
        _assert_same_export(converted, tmp_path / "run" / "export")


def test_converter_errors_say_what_to_pass(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--config" in capsys.readouterr().out

    with pytest.raises(UserError, match="nothing: no such directory"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a complete distft checkpoint: .*distft_checkpoint.json is missing"):
        export_checkpoint(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(UserError, match="--max-shard-size 5 gigs"):
        export_checkpoint(tmp_path / "empty", tmp_path / "out", max_shard_size="5 gigs")
    (tmp_path / "run" / "checkpoint_000004").mkdir(parents=True)
    with pytest.raises(UserError, match="looks like a run directory"):
        export_checkpoint(tmp_path / "run", tmp_path / "out")

    class _NoWeights:  # a strategy that saves nothing: a complete checkpoint of an unknown format
        def save(self, ckpt_dir, rank):
            pass

    ckpt = tmp_path / "bare" / "checkpoint_000001"
    save_checkpoint(ckpt, strategy=_NoWeights(), rank=0, world_size=1, step=1, loader_state={},
                    info={"method": "full", "strategy": "mystery", "model": "tiny_llama"})
    with pytest.raises(UserError, match=r"config.yaml is missing.*--config RUN_DIR/config.yaml"):
        export_checkpoint(ckpt, tmp_path / "out")
    _write_config(tmp_path / "bare", "full", "ddp")
    with pytest.raises(UserError, match="holds no model weights in a format .*strategy=mystery"):
        export_checkpoint(ckpt, tmp_path / "out")
    _write_config(tmp_path / "bare", "lora", "ddp")
    with pytest.raises(UserError, match="method=full run but the config says method=lora"):
        export_checkpoint(ckpt, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="not an empty directory"):
        export_checkpoint(ckpt, tmp_path / "taken")

    assert main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "distft.export_checkpoint: error:" in capsys.readouterr().err
