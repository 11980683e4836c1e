"""eval.gather=layerwise: a sharded model generates without any rank gathering the whole model, and answers as the
fully gathered model does, with a different number of prompts per rank (two gloo ranks, no Ray)."""

import json
from pathlib import Path

import torch

from distft.config.validate import CHOICES
from tests.conftest import rank_env
from tests.integration.conftest import spawn_two_ranks


def _worker(rank: int, port: int, model_dir: str, results: str) -> None:
    rank_env(rank, port)
    import torch.distributed as dist

    from distft.data import load_examples
    from distft.eval.evaluate import generates_layerwise, task_accuracy
    from distft.eval.tasks import get_task
    from distft.model import load_model, load_tokenizer
    from distft.stop import NO_STOP
    from distft.strategy.fsdp import FSDPStrategy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    strategy = FSDPStrategy(device=torch.device("cpu"), precision="fp32", rank0_load=False)
    strategy.prepare(model, lambda params: torch.optim.AdamW(params, lr=1e-3),
                     lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    examples = load_examples("gsm8k", Path(results, "data_dir").read_text(), "test", limit=3)  # rank 0 answers 2, rank 1 one (+ a filler)
    kwargs = dict(task=get_task("gsm8k"), template="auto", max_new_tokens=6, batch_size=1, rank=rank, world=2,
                  stop=NO_STOP, label="test")
    calls = []
    originals = {name: getattr(dist, name) for name in ("all_gather_into_tensor", "all_gather", "all_gather_single")
                 if hasattr(dist, name)}
    for name, original in originals.items():
        setattr(dist, name, lambda *a, _f=original, **k: (calls.append(1), _f(*a, **k))[1])
    gathered = task_accuracy(strategy, tokenizer, examples, **kwargs, layerwise=False)
    gathered_calls = len(calls)
    layerwise = task_accuracy(strategy, tokenizer, examples, **kwargs, layerwise=True)
    for name, original in originals.items():
        setattr(dist, name, original)
    Path(results, f"rank{rank}.json").write_text(json.dumps({
        "gathered": [p["output"] for p in gathered["predictions"]],
        "layerwise": [p["output"] for p in layerwise["predictions"]],
        "all_gathers_gathered": gathered_calls, "all_gathers_layerwise": len(calls) - gathered_calls,
        "auto_on_cpu": generates_layerwise("auto", strategy, torch.device("cpu")),
        "forced": generates_layerwise("layerwise", strategy, torch.device("cpu"))}))
    dist.destroy_process_group()


def test_layerwise_generation_answers_as_the_gathered_model_with_uneven_prompts_per_rank(tmp_path, gsm8k_dir):
    (tmp_path / "data_dir").write_text(str(gsm8k_dir))
    spawn_two_ranks(_worker, tmp_path, "layerwise generation")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert len(result["layerwise"]) == 3
        assert result["layerwise"] == result["gathered"]
        assert any(result["layerwise"])  # something was generated
        # sharded forwards: every decoding step gathers the layers again; the gathered model gathers once on entry
        assert result["all_gathers_layerwise"] > 3 * 6 > result["all_gathers_gathered"]
        assert result["auto_on_cpu"] is False and result["forced"] is True
    assert results[0]["layerwise"] == results[1]["layerwise"]


def test_eval_gather_is_checked_at_compose_time():
    assert CHOICES["eval.gather"] == ("auto", "full", "layerwise")
