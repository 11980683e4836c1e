"""Streaming rank-0 load under FSDP and ZeRO-3 (distft.strategy.streaming): every rank builds the model without
weights, rank 0 reads the safetensors checkpoint one decoder layer at a time into everyone's shards (FSDP) or
partitions (ZeRO-3).

The single-process tests check the pieces (finding the files, what cannot be streamed, the stand-ins peft sets up
its adapters on). One pair of spawned gloo ranks runs every two-rank case (FSDP: tied and untied embeddings, one file
and a sharded index, full and LoRA, fp32 and a bf16 cast, a .bin-only checkpoint that falls back; ZeRO-3: the same
except the bf16 cast) loaded both ways, and checks that the model that trains is the same bit for bit and that rank 0
never held more than one layer group.
"""

import contextlib
import weakref
from pathlib import Path

import pytest
import torch

from distft.errors import UserError
from distft.model import WeightSource, ensure_random_model, load_model
from distft.strategy.streaming import StreamingLoad, adapter_problem, open_checkpoint
from tests.conftest import rank_env
from tests.export_helpers import SHAPE, write_checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


# --- pieces, in this process ------------------------------------------------------------------------------------------


def test_checkpoint_files_are_found_as_from_pretrained_finds_them(checkpoints):
    sharded = WeightSource(checkpoints["sharded"]).safetensors_files()
    assert len(sharded) > 3 and all(Path(f).parent == Path(checkpoints["sharded"]) for f in sharded)
    assert [Path(f).name for f in WeightSource(checkpoints["tied"]).safetensors_files()] == ["model.safetensors"]
    assert WeightSource(checkpoints["bin"]).safetensors_files() == []


def test_checkpoints_that_cannot_be_streamed_as_they_are_say_why(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint, problem = open_checkpoint(load_model(checkpoints["tied"], empty=True), rank=0)
    assert problem is None and set(checkpoint.shapes) == {n for n, _ in
                                                          load_model(checkpoints["tied"]).named_parameters()}
    checkpoint, problem = open_checkpoint(load_model(checkpoints["bin"], empty=True), rank=0)
    assert checkpoint is None and "has no safetensors weights" in problem and "save_pretrained" in problem
    # a tensor missing and one of another shape: from_pretrained would initialise or refuse them
    state = load_file(Path(checkpoints["tied"]) / "model.safetensors")
    del state["model.norm.weight"]
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:2].contiguous()
    for name in ("config.json", "generation_config.json"):
        if (Path(checkpoints["tied"]) / name).exists():
            (tmp_path / name).write_bytes((Path(checkpoints["tied"]) / name).read_bytes())
    save_file(state, tmp_path / "model.safetensors")
    checkpoint, problem = open_checkpoint(load_model(str(tmp_path), empty=True), rank=0)
    assert checkpoint is None
    assert "has no tensor for model.norm.weight" in problem and "model.layers.0.mlp.up_proj.weight [2, 64]" in problem


def _lora(model):
    from distft.methods import apply_method

    torch.manual_seed(0)  # as the recipe seeds before loading: identical adapters on every rank
    return apply_method(model, name="lora", lora_r=4, lora_dropout=0.0, target_modules=["all-linear"])


def test_adapters_set_up_on_stand_ins_are_those_of_a_loaded_model(checkpoints):
    empty = load_model(checkpoints["sharded"], empty=True)
    StreamingLoad(empty, checkpoint=None)
    for p in empty.parameters():  # CPU, so peft keeps its adapters there, but one element of memory each
        assert not p.is_meta and p.untyped_storage().nbytes() == p.element_size()
    streamed, loaded = _lora(empty), _lora(load_model(checkpoints["sharded"]))
    adapters = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(adapters) == 4 * 7 * 2
    for name, p in streamed.named_parameters():
        if name in adapters:
            assert torch.equal(p, adapters[name]), name
    assert adapter_problem(streamed) is None


@pytest.mark.parametrize("config", [{"use_dora": True}, {"init_lora_weights": "olora"},
                                    {"modules_to_save": ["lm_head"]}])
def test_adapter_setups_that_read_the_base_weights_are_refused(checkpoints, config):
    from peft import LoraConfig, get_peft_model

    load = StreamingLoad(load_model(checkpoints["sharded"], empty=True), checkpoint=None)
    # set up on loaded weights here: on stand-ins some of these fail outright (OLoRA writes into the base weight)
    model = get_peft_model(load_model(checkpoints["sharded"]), LoraConfig(r=2, target_modules=["q_proj"], **config))
    with pytest.raises(UserError, match=r"strategy.rank0_load=false"):
        load.detach(model, layers=[])


# --- two ranks ----------------------------------------------------------------------------------------------------

CASES = [(strategy, ckpt, method, "fp32") for strategy in ("fsdp", "zero3") for ckpt in ("sharded", "tied")
         for method in ("full", "lora")]
CASES += [("fsdp", "sharded", "full", "bf16")]  # fp32 checkpoint cast to the bf16 load dtype tensor by tensor


class _HeldBytes:
    """Wraps safetensors' safe_open to count the bytes of the tensors read and still alive (a weak reference
    finalizer per tensor), and the most alive at once."""

    live = peak = 0

    def __init__(self, *args, **kwargs):
        from safetensors import safe_open

        self._file = safe_open(*args, **kwargs)

    def keys(self):
        return self._file.keys()

    def get_slice(self, key):
        return self._file.get_slice(key)

    def get_tensor(self, key):
        tensor = self._file.get_tensor(key)
        size = tensor.numel() * tensor.element_size()
        _HeldBytes.live += size
        _HeldBytes.peak = max(_HeldBytes.peak, _HeldBytes.live)
        weakref.finalize(tensor, _HeldBytes._release, size)
        return tensor

    @staticmethod
    def _release(size: int) -> None:
        _HeldBytes.live -= size

    @classmethod
    def reset(cls) -> None:
        cls.live = cls.peak = 0


def _strategy(name: str, streamed: bool):
    if name == "fsdp":
        from distft.strategy.fsdp import FSDPStrategy

        return FSDPStrategy(device=torch.device("cpu"), precision="fp32", rank0_load=streamed)
    from distft.strategy.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(device=torch.device("cpu"), precision="fp32", zero_stage=3, rank0_load=streamed,
                             deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}})


def _full_parameters(strategy) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    module = strategy.unwrap()
    params = list(module.parameters())
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params)
    with gathered:
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in module.named_parameters()}


def _run_case(rank: int, model_dir: str, strategy_name: str, method: str, dtype: str, streamed: bool) -> dict:
    from distft.methods import apply_method

    strategy = _strategy(strategy_name, streamed)
    read_whole = []  # load() calls that read weights (not empty=True)

    def load(**kwargs):
        read_whole.append(not kwargs.get("empty"))
        return load_model(model_dir, dtype=dtype, **kwargs)

    _HeldBytes.reset()
    torch.manual_seed(0)  # as the recipe does before loading: identical LoRA init on every rank
    model = strategy.load_model(load, rank=rank, quantized=False)
    streaming = getattr(strategy, "_streaming", None) is not None or getattr(strategy, "_streamed", False)
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    model = apply_method(model, name=method, lora_r=4, lora_dropout=0.0, target_modules=["all-linear"])
    strategy.prepare(model, lambda params: torch.optim.AdamW(params, lr=1e-2),
                     lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    peak = _HeldBytes.peak
    result = {"params": _full_parameters(strategy), "streaming": streaming, "read_whole": any(read_whole),
              "buffers": {n: b.clone() for n, b in strategy.unwrap().named_buffers()}, "peak": peak,
              "partitioned": partitioned}
    if dtype != "fp32":
        return result
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(rank))
    losses = []
    for _ in range(2):
        with strategy.sync_context(sync=True):
            loss = strategy.model(input_ids=ids, labels=ids, use_cache=False).loss
            strategy.backward(loss)
        losses.append(float(loss.detach()))
        strategy.step(1.0)
    return {**result, "losses": losses}


def _worker(rank: int, port: int, _tiny_model_dir: str, out_dir: str) -> None:
    rank_env(rank, port)
    import torch.distributed as dist

    import distft.export_shards as export_shards

    torch.set_num_threads(1)
    export_shards.safe_open = _HeldBytes  # count what rank 0 holds (distft.export_shards.open_safetensors)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dirs = torch.load(Path(out_dir) / "dirs.pt")
    results = {}
    for strategy, ckpt, method, dtype in CASES:
        for streamed in (False, True):
            results[(strategy, ckpt, method, dtype, streamed)] = _run_case(rank, dirs[ckpt], strategy, method, dtype,
                                                                           streamed)
    for strategy in ("fsdp", "zero3"):
        results[(strategy, "bin", "full", "fp32", True)] = _run_case(rank, dirs["bin"], strategy, "full", "fp32", True)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict]:
    from tests.integration.conftest import spawn_two_ranks

    out = tmp_path_factory.mktemp("streaming")
    torch.save(write_checkpoints(out), out / "dirs.pt")
    spawn_two_ranks(_worker, out, "streaming load")
    return {r: torch.load(out / f"rank{r}.pt") for r in (0, 1)}


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy,ckpt,method,dtype", CASES, ids=["-".join(c) for c in CASES])
def test_streaming_load_trains_the_same_model_as_loading_everywhere(strategy, ckpt, method, dtype, results):
    for rank in (0, 1):
        everywhere = results[rank][(strategy, ckpt, method, dtype, False)]
        streamed = results[rank][(strategy, ckpt, method, dtype, True)]
        assert streamed["streaming"] and not everywhere["streaming"]
        if strategy == "zero3":  # partitioned as load_model returns it, as transformers' zero.Init load does
            assert streamed["partitioned"] and not everywhere["partitioned"]
        assert not streamed["read_whole"] and everywhere["read_whole"]  # no rank called from_pretrained
        _assert_same(streamed["params"], everywhere["params"])  # base weights and LoRA adapters
        _assert_same(streamed["buffers"], everywhere["buffers"])  # rotary inv_freq
        assert streamed.get("losses") == everywhere.get("losses")  # first step's loss and the update it makes
    params = results[0][(strategy, ckpt, method, dtype, True)]["params"]
    if ckpt == "tied":
        assert not any(n.endswith("lm_head.weight") for n in params)  # one parameter, shared with the embedding
    assert sum("lora_" in n for n in params) == (4 * 7 * 2 if method == "lora" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_rank0_never_holds_more_than_one_decoder_layer_of_the_checkpoint(strategy, method, results):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(ensure_random_model(**SHAPE), dtype=torch.float32)

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    layer = max(size(layer.parameters()) for layer in reference.model.layers)
    model = size(reference.parameters())
    assert layer > max(p.numel() * p.element_size() for n, p in reference.named_parameters() if "layers" not in n)
    largest = max(p.numel() * p.element_size() for p in reference.parameters())
    # FSDP reads one layer group at a time; ZeRO-3 copies each tensor into its group's parameters as it is read
    expected = layer if strategy == "fsdp" else largest
    assert results[0][(strategy, "sharded", method, "fp32", True)]["peak"] == expected
    assert layer < model / 5
    assert results[1][(strategy, "sharded", method, "fp32", True)]["peak"] == 0  # the other rank reads nothing


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_a_checkpoint_without_safetensors_falls_back_to_rank0_reading_it_whole(strategy, results):
    for rank in (0, 1):
        fallback = results[rank][(strategy, "bin", "full", "fp32", True)]
        assert not fallback["streaming"]
        if strategy == "fsdp":
            assert fallback["read_whole"] is (rank == 0)
        else:  # transformers' zero.Init load: rank 0 reads, every rank's parameters partitioned as they are built
            assert fallback["partitioned"]
        everywhere = results[rank][(strategy, "sharded", "full", "fp32", False)]  # the same weights, every rank loads
        _assert_same(fallback["params"], everywhere["params"])
        assert fallback["losses"] == everywhere["losses"]
