"""Run storage behind URIs, checkpoint validity (manifests), resume fallback and failure messages."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from distft.checkpoint import ResumeChoice, check_checkpoint, choose_resume, save_checkpoint
from distft.errors import ConfigError, UserError
from distft.storage import RunStorage, checkpoint_sort_key, resolve_filesystem
from tests.conftest import compose_cfg


class FakeStrategy:
    """Writes one file per rank, as sharded strategies do."""

    def save(self, ckpt_dir: Path, rank: int) -> None:
        (ckpt_dir / f"shard{rank}.bin").write_bytes(bytes(1000 + rank))


def make_checkpoint(path: Path, step: int, world: int = 2) -> Path:
    """What Ray builds: every rank saves into its own directory, then the directories are merged."""
    for rank in range(world):
        part = path.parent / f"{path.name}.rank{rank}"
        save_checkpoint(part, strategy=FakeStrategy(), rank=rank, world_size=world, step=step,
                        loader_state={"pos": step}, info={})
        shutil.copytree(part, path, dirs_exist_ok=True)
        shutil.rmtree(part)
    return path


def test_checkpoint_validity_detects_missing_truncated_and_unfinished_saves(tmp_path):
    ckpt = make_checkpoint(tmp_path / "checkpoint_000002", step=2)
    assert check_checkpoint(ckpt) is None
    # through a pyarrow filesystem that is not the local one (as for s3:// or gs://)
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert check_checkpoint("checkpoint_000002", sub) is None

    (ckpt / "shard1.bin").write_bytes(b"short")
    assert "shard1.bin has 5 bytes, rank 1 wrote 1001" in check_checkpoint(ckpt)
    (ckpt / "shard1.bin").unlink()
    assert "lacks shard1.bin (written by rank 1)" in check_checkpoint(ckpt)
    (ckpt / "distft_checkpoint.json").unlink()
    assert "missing (the save was interrupted)" in check_checkpoint(sub.normalize_path("checkpoint_000002"), sub)


def test_uri_storage_stages_locally_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTFT_CACHE", str(tmp_path / "cache"))
    store = RunStorage(f"file://{tmp_path}/bucket/", "run1")
    assert store.remote and store.uri == f"file://{tmp_path}/bucket/run1"
    assert store.local_dir.is_relative_to(tmp_path / "cache")  # staging, not the storage
    store.local_dir.mkdir(parents=True)
    (store.local_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (store.local_dir / "export").mkdir()
    (store.local_dir / "export" / "model.safetensors").write_text("w")
    store.push("metrics.jsonl", "export", "absent.json")
    assert (tmp_path / "bucket" / "run1" / "export" / "model.safetensors").read_text() == "w"
    assert store.exists("metrics.jsonl") and not store.exists("absent.json")
    assert store.read_text("metrics.jsonl") == '{"step": 1}\n'
    assert store.location("export") == f"file://{tmp_path}/bucket/run1/export"

    shutil.rmtree(store.local_dir)  # another node: nothing staged yet
    store.pull("metrics.jsonl", "absent.json")
    assert (store.local_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'

    local = RunStorage(str(tmp_path / "plain"), "run1")
    assert not local.remote and local.local_dir == tmp_path / "plain" / "run1"
    local.push("anything")  # no-ops for a local path
    local.pull("anything")


def test_checkpoint_dirs_newest_step_first():
    names = ["checkpoint_000004", "checkpoint_000010", "checkpoint_000004-r17", "checkpoint_000006"]
    assert sorted(names, key=checkpoint_sort_key, reverse=True) == [
        "checkpoint_000010", "checkpoint_000006", "checkpoint_000004-r17", "checkpoint_000004"]


def test_unknown_uri_scheme_is_a_user_error():
    with pytest.raises(UserError, match="run.storage_path=nosuchfs://x: pyarrow cannot open it"):
        resolve_filesystem("nosuchfs://x")


def test_cloud_uris_pass_validation_and_bad_retention_does_not(tmp_path):
    from distft.config import validate_config

    base = ["+experiment=gsm8k_lora", "model=tiny_llama", "hardware=cpu", f"data.path={tmp_path}"]
    validate_config(compose_cfg([*base, "run.storage_path=s3://bucket/runs"]))  # no error
    with pytest.raises(ConfigError, match="run.num_to_keep=0 must be at least 1"):
        validate_config(compose_cfg([*base, "run.num_to_keep=0"]))


def _choose(latest: Path, store: RunStorage, explicit: str | None = None) -> ResumeChoice:
    return choose_resume(str(latest), filesystem=pafs.LocalFileSystem(), storage=store, explicit=explicit)


def test_resume_falls_back_to_the_newest_complete_older_checkpoint(tmp_path):
    store = RunStorage(str(tmp_path), "run")
    for step in (2, 4, 6):
        make_checkpoint(store.local_dir / f"checkpoint_{step:06d}", step=step)
    (store.local_dir / "checkpoint_000008").mkdir()  # an upload cut short: never committed, newer than Ray's

    latest = store.local_dir / "checkpoint_000006"
    assert _choose(latest, store) == ResumeChoice(path=str(latest))
    assert choose_resume(None, filesystem=None, storage=store, explicit=None) == ResumeChoice()  # a fresh run

    (latest / "rank0_state.pt").unlink()
    choice = _choose(latest, store)
    assert choice.path.endswith("checkpoint_000004") and choice.name_suffix.startswith("-r")
    assert "checkpoint_000006 is incomplete" in choice.warning and "lacks ['rank0_state.pt']" in choice.warning
    assert choice.refusal is None

    # the same broken checkpoint named explicitly with run.resume_from: no silent fallback
    refusal = _choose(latest, store, explicit=str(latest)).refusal
    assert refusal.startswith("run.resume_from=")

    for step in (2, 4):
        (store.local_dir / f"checkpoint_{step:06d}" / "distft_checkpoint.json").unlink()
    refusal = _choose(latest, store).refusal
    assert "no complete checkpoint_* is left" in refusal and "run.resume_from" in refusal


def test_failure_message_names_the_failing_rank_and_cause():
    from ray.train import WorkerGroupError

    from distft.launch import failure_message

    inner = RuntimeError("boom")
    error = WorkerGroupError("rank 1 died", {1: inner})
    assert failure_message(error, max_failures=2) == \
        "worker rank 1: RuntimeError: boom (run.max_failures=2 restart(s) allowed)"


def test_multi_node_run_refuses_a_path_another_node_cannot_see(tmp_path, monkeypatch):
    """The probe logic with Ray's calls replaced: node B answers that the probe file is not there (the real
    multi-node path, where every node sees it, runs in tests/integration/test_cluster.py)."""
    import ray

    from distft.launch import check_shared_storage

    nodes = [{"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1"},
             {"Alive": True, "NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2"},
             {"Alive": False, "NodeID": "c" * 56, "NodeManagerAddress": "10.0.0.3"}]
    seen = {}

    class Task:
        def __init__(self, fn):
            self.fn = fn

        def options(self, scheduling_strategy):
            node = scheduling_strategy.node_id
            return SimpleNamespace(remote=lambda path: (node, self.fn(path) and node.startswith("a")))

    def get(ref, timeout=None):
        seen[ref[0]] = ref[1]
        return ref[1]

    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "remote", lambda **kw: Task)
    monkeypatch.setattr(ray, "get", get)
    store = RunStorage(str(tmp_path / "runs"), "r")
    store.local_dir.mkdir(parents=True)
    with pytest.raises(UserError, match=r"run.storage_path=.*runs is node-local .*10\.0\.0\.2 \(bbbbbbbb\) cannot see "
                                        r"it.*s3://BUCKET/runs"):
        check_shared_storage(store)
    assert set(seen) == {"a" * 56, "b" * 56}  # dead nodes are not asked
    assert not list(store.local_dir.iterdir())  # the probe file is removed

    nodes[1]["Alive"] = False  # one node left: nothing to check
    check_shared_storage(store)
