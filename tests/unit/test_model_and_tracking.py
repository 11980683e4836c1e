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
