"""FSDP2 strategy pieces that need no Ray: config checks, layer discovery, tied weights, collective-free generation.

The sharded tests run in this process on a one-rank gloo group: FSDP2 goes through its full DTensor and collective
machinery with one rank, which is enough to check that weights stay tied, that an update equals the unsharded one,
and which forwards communicate. Two-rank behaviour (parity with DDP, resume, export) is in the slow tier.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distft.strategy import strategy_problems
from distft.strategy.fsdp import FSDPStrategy, _prepare_4bit_layers, decoder_layers
from tests.conftest import compose_cfg, tiny_llama_model, tiny_model_dir


def _options(strategy: str, *overrides: str) -> dict:
    cfg = compose_cfg(["+experiment=gsm8k_lora", "hardware=cpu", f"strategy={strategy}", *overrides])
    return dict(cfg.strategy)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_offload"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_presets_have_no_problems(strategy, method):
    assert strategy_problems(strategy, method=method, precision="fp32", use_gpu=False,
                             options=_options(strategy)) == []
    assert strategy_problems(strategy, method=method, precision="bf16", use_gpu=True,
                             options=_options(strategy)) == []


def test_options_of_other_strategies_are_reported_with_the_fsdp_alternative():
    options = _options("fsdp", "strategy.offload_optimizer=true", "strategy.zero_stage=3",
                       "strategy.find_unused_parameters=true")
    problems = FSDPStrategy.config_problems(method="lora", precision="fp32", use_gpu=False, options=options)
    assert len(problems) == 3
    offload, = [p for p in problems if "offload_optimizer" in p]
    assert "strategy.offload_optimizer=True" in offload and "strategy=fsdp" in offload
    assert "strategy=fsdp_offload" in offload  # the working alternative
    stage, = [p for p in problems if "zero_stage" in p]
    assert "strategy.zero_stage=3" in stage and "strategy=zero1/zero2/zero3" in stage


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_offload"])
def test_qlora_float_storage_that_mixed_precision_would_cast_is_refused_at_validation(strategy):
    def problems(precision, quant_storage):
        return strategy_problems(strategy, method="qlora", precision=precision, use_gpu=precision == "bf16",
                                 options=_options(strategy), quant_storage=quant_storage)

    (problem,) = problems("bf16", "fp32")
    assert "method.quant_storage=fp32" in problem and "set method.quant_storage=bf16" in problem
    assert f"strategy={strategy}" in problem
    assert problems("bf16", "bf16") == problems("bf16", None) == problems("fp32", "fp32") == []


def _tiny_llama(tied: bool):
    model = tiny_llama_model(tied=tied, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.config.use_cache = False
    return model


def test_decoder_layers_are_found_through_peft_wrappers():
    from peft import LoraConfig, get_peft_model

    assert len(decoder_layers(_tiny_llama(tied=False))) == 2
    peft_model = get_peft_model(_tiny_llama(tied=False), LoraConfig(r=2, target_modules="all-linear"))
    assert [type(m).__name__ for m in decoder_layers(peft_model)] == ["LlamaDecoderLayer"] * 2


def test_4bit_layers_leave_the_cpu_repacking_kernel_and_mixed_precision_refuses_float_storage():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_storage=torch.float32, quant_type="nf4").to("cpu")
    model = torch.nn.Sequential(layer)
    _prepare_4bit_layers(model, param_dtype=None)  # fp32: fine
    assert layer.support_avx512bf16_for_cpu is False
    with pytest.raises(ValueError, match="method.quant_storage=bf16"):
        _prepare_4bit_layers(model, param_dtype=torch.bfloat16)
    uint8 = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4").to("cpu"))
    _prepare_4bit_layers(uint8, param_dtype=torch.bfloat16)  # integer storage is not cast: fine


def test_uint8_4bit_weights_under_fsdp_bf16_are_refused_on_a_torch_that_casts_them(monkeypatch):
    """GPU_REVIEW #3: torch 2.9.1's FSDP2 (the Docker base image's before 2.13) casts integer parameters to the
    param dtype."""
    bnb = pytest.importorskip("bitsandbytes")
    import distft.strategy.fsdp as fsdp

    assert not fsdp.fsdp_keeps_integer_params("2.9.1+cu128") and fsdp.fsdp_keeps_integer_params("2.13.0")
    assert fsdp.fsdp_keeps_integer_params("2.14.0.dev20261101+cu130") and fsdp.fsdp_keeps_integer_params()
    monkeypatch.setattr(fsdp, "fsdp_keeps_integer_params", lambda: False)
    uint8 = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4").to("cpu"))
    with pytest.raises(ValueError, match=r"torch >= 2\.13.*method\.quant_storage=bf16"):
        _prepare_4bit_layers(uint8, param_dtype=torch.bfloat16)
    _prepare_4bit_layers(uint8, param_dtype=None)  # fp32 FSDP: nothing is cast


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _prepared(model, lr=1e-2) -> FSDPStrategy:
    strategy = FSDPStrategy(device=torch.device("cpu"), precision="fp32", reshard_after_forward=True)
    strategy.prepare(model, build_optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
                     build_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    return strategy


def _train_step(model, step_fn, ids):
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return float(loss.detach()), step_fn()


def test_tied_embeddings_stay_tied_train_like_unsharded_and_export(one_rank_group, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = _tiny_llama(tied=True)
    model = copy.deepcopy(reference)
    strategy = _prepared(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # one parameter, sharded once

    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        ref_loss, ref_norm = _train_step(reference, lambda: float(torch.nn.utils.clip_grad_norm_(
            reference.parameters(), 1.0)), ids)
        opt.step()
        opt.zero_grad()
        loss, norm = _train_step(model, lambda: strategy.step(1.0), ids)
        assert loss == pytest.approx(ref_loss, rel=1e-6) and norm == pytest.approx(ref_norm, rel=1e-5)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.allclose(model.lm_head.weight.full_tensor(), reference.lm_head.weight, atol=1e-6)

    class _NoTokenizer:
        def save_pretrained(self, out_dir):
            pass

    out = tmp_path / "export"
    out.mkdir()
    strategy.export(out, _NoTokenizer(), rank=0)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.config.tie_word_embeddings and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert reloaded.config.architectures == ["LlamaForCausalLM"]  # not the FSDP wrapper class
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def test_generation_context_yields_full_weights_and_restores_sharding(one_rank_group):
    # One rank never communicates; the two-rank test in tests/integration counts the collectives.
    model = _tiny_llama(tied=False)
    strategy = _prepared(model)
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    layer = decoder_layers(model)[0]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with strategy.generation_context() as gen_model:
            assert gen_model is model
            assert not any(isinstance(p, DTensor) for p in model.parameters())  # gathered, plain tensors
            assert not getattr(model, "_is_fsdp_managed_module", False)  # so `generate` does not sync ranks
            out = gen_model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
            logits = gen_model(input_ids=ids).logits
    assert out.shape == (1, 13)
    assert torch.equal(logits, expected)
    assert model._is_fsdp_managed_module  # restored
    assert all(isinstance(p, DTensor) for p in layer.parameters())  # resharded
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(isinstance(p, DTensor) for p in layer.parameters())  # layers still reshard after forward
    assert strategy.step(1.0) > 0


def _gradient_sync(model) -> set[bool]:
    return {group.reduce_grads for m in model.modules() if hasattr(m, "_get_fsdp_state")
            for group in m._get_fsdp_state()._fsdp_param_groups}


def test_full_fine_tuning_reduce_scatters_every_micro_batch_and_lora_accumulates_unsharded(one_rank_group):
    """Full fine-tuning: a micro-batch without sync still reduce-scatters, so gradients stay sharded (FSDP2 would
    otherwise hold the whole model's unsharded fp32 gradients until the last micro-batch). LoRA keeps no-sync;
    either way two accumulated micro-batches give the gradient of their sum."""
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    for lora in (False, True):
        reference = _tiny_llama(tied=False)
        if lora:
            reference = get_peft_model(reference, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
        model = copy.deepcopy(reference)
        strategy = _prepared(model)
        assert strategy.sync_every_micro_batch is not lora
        for i, sync in enumerate((False, True)):
            with strategy.sync_context(sync=sync):
                assert _gradient_sync(model) == {sync or not lora}
                model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
            assert _gradient_sync(model) == {True}
            grads = [p.grad for p in strategy.trainable_parameters()]
            if not sync:  # sharded gradients after the first micro-batch only when it was reduce-scattered
                assert all(g is None for g in grads) if lora else all(isinstance(g, DTensor) for g in grads)
        for i in range(2):
            reference(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        expected = [p.grad for p in reference.parameters() if p.requires_grad]
        got = [p.grad.full_tensor() for p in strategy.trainable_parameters()]
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_rank0_load_is_refused_where_it_cannot_work():
    def problems(name, method, **options):
        return strategy_problems(name, method=method, precision="fp32", use_gpu=False,
                                 options={"name": name, "rank0_load": True, **options})

    assert problems("fsdp", "lora") == [] and problems("zero3", "full", zero_stage=3) == []
    assert "full replica" in problems("ddp", "full")[0]
    assert "ZeRO stage 3" in problems("zero2", "full", zero_stage=2)[0]
    for name, extra in (("fsdp", {}), ("zero3", {"zero_stage": 3})):
        (problem,) = problems(name, "qlora", **extra)
        assert "method=qlora" in problem and "remove strategy.rank0_load" in problem


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_empty_model_has_the_architecture_but_reads_no_weights_and_leaves_the_rng_alone(dtype):
    from distft.model import WeightSource, load_model

    model_dir = tiny_model_dir()
    torch.manual_seed(0)
    empty = load_model(model_dir, empty=True, dtype=dtype)
    after_empty = torch.rand(1)
    torch.manual_seed(0)
    full = load_model(model_dir, dtype=dtype)
    assert torch.equal(torch.rand(1), after_empty)  # LoRA init after loading is the same either way
    assert all(p.is_meta for p in empty.parameters())
    assert [(n, p.shape, p.dtype) for n, p in empty.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in full.named_parameters()]
    # buffers (the rotary inv_freq, in no checkpoint) are computed as a load computes them: nothing fills them later
    buffers = dict(full.named_buffers())
    assert buffers and dict(empty.named_buffers()).keys() == buffers.keys()
    for name, buf in empty.named_buffers():
        assert buf.dtype == buffers[name].dtype and torch.equal(buf, buffers[name]), name
    assert empty.weight_source == WeightSource(model_dir)  # where a streaming load reads the weights
    assert empty.generation_config.to_dict() == full.generation_config.to_dict()  # same greedy decoding
    assert empty.config.use_cache is False
    with pytest.raises(ValueError, match="4-bit"):
        load_model(model_dir, empty=True, quantization_config=object())

