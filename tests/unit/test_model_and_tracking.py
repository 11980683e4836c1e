"""Model loading errors and W&B's promise never to stop training."""

import sys
import types

import pytest

from distft.errors import UserError
from distft.model import load_model, load_tokenizer
from distft.tracking import WandbLogger


def test_unreachable_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_tokenizer, load_model):
        with pytest.raises(UserError) as e:
            load(str(tmp_path / "no-such-model"))
        assert "model.path=" in str(e.value) and "model=smollm2_135m hardware=cpu" in str(e.value)


def test_wandb_failures_become_warnings(tmp_path, monkeypatch, caplog):
    def broken_init(**_):
        raise RuntimeError("no network")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=broken_init))
    logger = WandbLogger(project="p", entity=None, group=None, tags=[], mode=None, run_name="r", run_dir=tmp_path,
                         config={}, resume=False)
    logger.log({"loss": 1.0}, step=1)  # must not raise
    logger.summary({"x": 1})
    logger.finish()
    assert "W&B disabled" in caplog.text


def test_wandb_log_failure_disables_wandb_but_not_training(tmp_path, monkeypatch, caplog):
    class Run:
        summary = {}

        def log(self, *_, **__):
            raise OSError("disk full")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **_: Run()))
    logger = WandbLogger(project="p", entity=None, group=None, tags=[], mode=None, run_name="r", run_dir=tmp_path,
                         config={}, resume=False)
    logger.log({"loss": 1.0}, step=1)
    assert logger.run is None and "disabling W&B" in caplog.text


def test_a_gpu_replica_loads_straight_onto_its_device(monkeypatch):
    """GPU_REVIEW #10: from_pretrained with device_map={"": cuda:k}, not a host copy per rank moved afterwards; on
    CPU (and under DeepSpeed's zero.Init) the model loads as before."""
    import torch
    from transformers import AutoModelForCausalLM

    import distft.model
    from tests.conftest import tiny_model_dir

    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(path, **{k: v for k, v in kwargs.items() if k != "device_map"})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    cuda = torch.device("cuda", 3)
    load_model(tiny_model_dir(), device=cuda)  # the spy loads on CPU; no .to(cuda) may follow a device_map
    load_model(tiny_model_dir(), device=torch.device("cpu"))
    monkeypatch.setattr(distft.model, "_zero3_init", lambda: True)
    try:
        load_model(tiny_model_dir(), device=cuda)
    except (RuntimeError, AssertionError):  # without CUDA the move after loading fails: that it was tried is enough
        pass
    assert seen == [{"": cuda}, None, None]
