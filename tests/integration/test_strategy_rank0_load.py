"""Rank-0 loading (`strategy.rank0_load`, the default for fsdp and zero3) on two gloo ranks without Ray: no rank
loads the whole model (rank 0 streams the checkpoint layer by layer into FSDP's shards or ZeRO-3's partitions,
distft.strategy.streaming), and the model that trains is the same, bit for bit, as when every rank loads.

One pair of processes runs every case (fsdp and zero3, full and LoRA, each loaded both ways) on the tiny random Llama,
to keep the cost to one process start-up.
"""

from pathlib import Path

import pytest
import torch

from tests.conftest import rank_env
from tests.integration.conftest import spawn_two_ranks

pytestmark = pytest.mark.slow

CASES = [(strategy, method) for strategy in ("fsdp", "zero3") for method in ("full", "lora")]


def _build(strategy: str):
    from distft.strategy import build_strategy

    options = {"fsdp": {"reshard_after_forward": True},
               "zero3": {"zero_stage": 3, "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}}
    return build_strategy("zero3" if strategy == "zero3" else "fsdp", device=torch.device("cpu"), precision="fp32",
                          micro_batch_size=1, grad_accum=1, options=options[strategy])


def _run_case(rank: int, model_dir: str, strategy_name: str, method: str, rank0_load: bool) -> dict:
    from distft.loss import causal_lm_loss_sum
    from distft.methods import apply_method
    from distft.model import load_model

    strategy = _build(strategy_name)
    strategy.rank0_load = rank0_load
    reads = []  # which ranks read the checkpoint file

    def load(**kwargs):
        model = load_model(model_dir, **kwargs)
        reads.append(not any(p.is_meta for p in model.parameters()) and not kwargs.get("empty"))
        return model

    torch.manual_seed(0)  # as the recipe does: identical LoRA init on every rank
    model = strategy.load_model(load, rank=rank, quantized=False)
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 partitioned while loading
    model = apply_method(model, name=method, lora_dropout=0.0, target_modules=["all-linear"])
    strategy.prepare(model, lambda params: torch.optim.AdamW(params, lr=1e-2),
                     lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(rank))
    probe = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(99))
    strategy.model.eval()
    with torch.no_grad():
        logits = strategy.model(input_ids=probe, use_cache=False).logits.float()
    strategy.model.train()
    losses = []
    for _ in range(2):
        with strategy.sync_context(sync=True):
            loss = causal_lm_loss_sum(strategy.model(input_ids=ids, use_cache=False).logits, ids) / ids.numel()
            strategy.backward(loss)
        losses.append(float(loss.detach()))
        strategy.step(1.0)
    return {"losses": losses, "logits": logits, "read_weights": any(reads),
            "partitioned": partitioned}


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    rank_env(rank, port)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for strategy, method in CASES:
        for rank0_load in (False, True):
            results[f"{strategy}-{method}-{rank0_load}"] = _run_case(rank, model_dir, strategy, method, rank0_load)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("rank0-load")
    spawn_two_ranks(_worker, out, "rank-0 loading")
    return {r: torch.load(out / f"rank{r}.pt") for r in (0, 1)}


@pytest.mark.parametrize("strategy,method", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_rank0_load_trains_the_same_model_as_loading_everywhere(strategy, method, results):
    for rank in (0, 1):
        everywhere = results[rank][f"{strategy}-{method}-False"]
        rank0 = results[rank][f"{strategy}-{method}-True"]
        # same weights (identical logits before any step), same updates (identical losses over two steps)
        assert torch.equal(rank0["logits"], everywhere["logits"]), (rank0["logits"] - everywhere["logits"]).abs().max()
        assert rank0["losses"] == everywhere["losses"]
        assert everywhere["read_weights"]
    # no rank read the whole model: rank 0 streamed it layer by layer into the shards / ZeRO-3 partitions
    assert not any(results[r][f"{strategy}-{method}-True"]["read_weights"] for r in (0, 1))
    if strategy == "zero3":  # partitioned as load_model returns them, as DeepSpeed's zero.Init does
        assert all(results[r][f"{strategy}-{method}-True"]["partitioned"] for r in (0, 1))
        assert not results[0][f"{strategy}-{method}-False"]["partitioned"]
    # both ranks compute the same logits of the same (sharded) model
    assert torch.equal(results[0][f"{strategy}-{method}-True"]["logits"], results[1][f"{strategy}-{method}-True"]["logits"])

