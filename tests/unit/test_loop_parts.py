"""Pieces of the loop that must be exact: the loss, the schedule, checkpoint validity and metrics on resume."""

import json

import pytest
import torch

from distft.checkpoint import META, check_checkpoint, load_checkpoint, save_checkpoint
from distft.loop import steady_throughput
from distft.loss import causal_lm_loss_sum
from distft.optim import build_scheduler
from distft.tracking import MetricsFile, read_metrics


def test_loss_sum_counts_only_answer_tokens_after_the_shift():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100]])  # tokens 2 and 3 are answer tokens
    expected = (torch.nn.functional.cross_entropy(logits[0, 1], torch.tensor(3), reduction="sum")
                + torch.nn.functional.cross_entropy(logits[0, 2], torch.tensor(4), reduction="sum"))
    assert torch.allclose(causal_lm_loss_sum(logits, labels), expected)



@pytest.mark.parametrize("chunk", [1, 7, 16, 49, 1000])
def test_chunked_loss_gives_the_same_gradients_and_the_loss_up_to_summation_order(chunk):
    torch.manual_seed(0)
    logits = torch.randn(3, 50, 257, requires_grad=True)
    labels = torch.randint(0, 257, (3, 50))
    labels[:, :20] = -100  # prompts
    labels[1] = -100  # a row without an answer: its chunks are skipped
    whole = causal_lm_loss_sum(logits, labels)
    (expected,) = torch.autograd.grad(whole, logits)
    chunked = causal_lm_loss_sum(logits, labels, chunk_tokens=chunk)
    (got,) = torch.autograd.grad(chunked, logits)
    assert torch.equal(got, expected)  # per-logit gradients do not depend on how the sum is split
    assert float(chunked) == pytest.approx(float(whole), rel=1e-6)
    assert float(causal_lm_loss_sum(logits, torch.full_like(labels, -100), chunk_tokens=chunk)) == 0.0

@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, schedule, warmup=2, total=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1.0)
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] < lrs[3] < 1.0
    if schedule == "cosine":
        assert min(lrs[2:]) >= 0.1 - 1e-9  # min_lr_ratio is a floor


def test_throughput_leaves_out_the_warm_up_step():
    assert steady_throughput([100, 200, 200], [10.0, 1.0, 1.0]) == 200.0
    assert steady_throughput([100], [2.0]) == 50.0
    assert steady_throughput([], []) is None


class _TinyStrategy:
    """The strategy part of a checkpoint, for testing the files around it."""

    def __init__(self):
        self.weights = torch.arange(4.0)

    def save(self, ckpt_dir, rank):
        if rank == 0:
            torch.save(self.weights, ckpt_dir / "w.pt")

    def load(self, ckpt_dir, rank):
        self.weights = torch.load(ckpt_dir / "w.pt")


def test_checkpoint_round_trip_restores_rng_and_loader(tmp_path):
    strategy = _TinyStrategy()
    torch.manual_seed(123)
    for rank in (1, 0):  # rank 0 writes the metadata last
        save_checkpoint(tmp_path, strategy=strategy, rank=rank, world_size=2, step=7,
                        loader_state={"epoch": 1, "index": 3}, info={"method": "lora"})
    expected_next = torch.rand(3)
    assert check_checkpoint(tmp_path) is None
    torch.manual_seed(999)
    fresh = _TinyStrategy()
    fresh.weights = torch.zeros(4)
    state = load_checkpoint(tmp_path, strategy=fresh, rank=0, world_size=2)
    assert state["step"] == 7 and state["loader"] == {"epoch": 1, "index": 3} and state["method"] == "lora"
    assert torch.equal(fresh.weights, torch.arange(4.0))
    assert torch.equal(torch.rand(3), expected_next)  # the RNG stream continues where it was saved


def test_incomplete_checkpoints_are_detected(tmp_path):
    strategy = _TinyStrategy()
    save_checkpoint(tmp_path, strategy=strategy, rank=1, world_size=2, step=1, loader_state={}, info={})
    assert "missing" in check_checkpoint(tmp_path)  # rank 0 never finished: no metadata
    save_checkpoint(tmp_path, strategy=strategy, rank=0, world_size=2, step=1, loader_state={}, info={})
    (tmp_path / "rank1_state.pt").unlink()
    assert "rank1_state.pt" in check_checkpoint(tmp_path)
    (tmp_path / META).write_text("{not json")
    assert "corrupt" in check_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match="cannot resume"):
        load_checkpoint(tmp_path, strategy=strategy, rank=0, world_size=2)


def test_resume_with_another_world_size_is_refused(tmp_path):
    strategy = _TinyStrategy()
    save_checkpoint(tmp_path, strategy=strategy, rank=0, world_size=1, step=1, loader_state={}, info={})
    with pytest.raises(RuntimeError, match="scaling.num_workers=1"):
        load_checkpoint(tmp_path, strategy=strategy, rank=0, world_size=2)


def test_metrics_file_drops_steps_after_the_resumed_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    metrics = MetricsFile(path, resume_step=4)
    metrics.log({"step": 5, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 0.5)]
