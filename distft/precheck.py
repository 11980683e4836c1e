"""The run's inputs, checked on the driver before Ray starts: the storage path, the model directory and tokenizer,
and the data exactly as the workers will read it (every JSONL line, the fields of the data format, at least one
example within data.seq_len, enough rows for one optimizer step, the test split when evaluation is on).

What the driver cannot read (a node-local path on a cluster it joins, a hub model it cannot reach from here) is
left to the workers, and `check_inputs` says so in the notes it returns. Each refusal is a UserError that names the
file and line or the config key, and the fix."""

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from distft.data import load_examples
from distft.errors import ConfigError, UserError
from distft.model import load_tokenizer
from distft.settings import run_settings
from distft.storage import is_uri


@dataclass
class CheckedInputs:
    """What `check_inputs` left to the workers, and the training split it built (None when left to the workers):
    the driver hands those rows to the workers, who would otherwise tokenise and pack the split again."""

    notes: list[str]
    train: tuple[list, dict, str] | None = None  # rows, stats, template (distft.recipe.training_rows)


def check_inputs(cfg, model_dir: str, *, joins_cluster: bool) -> CheckedInputs:
    """Raise a UserError for the first input that cannot work; return notes on what was left to the workers.
    `joins_cluster`: the workers run on a cluster this machine joins, so local paths may be node-local."""
    notes: list[str] = []
    d = cfg.data
    readable = d.path is None or Path(d.path).exists()
    if not readable:
        if not joins_cluster:
            raise ConfigError([f"data.path={d.path} does not exist; point it at a directory with train.jsonl "
                               "and test.jsonl (or, for data=jsonl, a train .jsonl file)"])
        notes.append(f"data.path={d.path} is not readable on this machine (node-local?): checked on the workers")
    check_model_dir(model_dir)
    try:
        check_hub_model(model_dir, revision=cfg.model.revision)
        tokenizer = _tokenizer(model_dir, cfg.model.revision)
    except UserError:
        if not joins_cluster:
            raise
        notes.append(f"the tokenizer of {model_dir} cannot be loaded here: the data is checked on the workers")
        return CheckedInputs(notes)
    return CheckedInputs(notes, check_data(cfg, tokenizer) if readable else None)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str, revision: str | None):
    """Loaded once per process: compare arms, sweeps and tests check many runs with the same tokenizer."""
    return load_tokenizer(model_dir, revision=revision)


def check_model_dir(model_dir: str) -> None:
    """A model.path that names a local directory must hold a model (a hub id is checked by loading its tokenizer)."""
    looks_local = model_dir.startswith(("/", "./", "../", "~")) or Path(model_dir).exists()
    if not looks_local or is_uri(model_dir):
        return
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ConfigError([f"model.path={model_dir} does not exist; point it at a local model directory "
                           "(config.json, weights, tokenizer) or a Hugging Face id such as meta-llama/Llama-2-7b-hf"])
    if not (path / "config.json").is_file():
        raise ConfigError([f"model.path={model_dir} has no config.json, so it is not a Hugging Face model directory "
                           "(save one with save_pretrained, or use a hub id)"])


def check_hub_model(model_dir: str, *, revision: str | None = None, timeout: float = 10.0) -> None:
    """A hub id that is not in the local cache must be reachable and readable with this machine's token. Asked once
    with a short timeout: transformers' own retries take about a minute to say the hub is unreachable."""
    if Path(model_dir).expanduser().exists():
        return
    from huggingface_hub import auth_check, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(model_dir, "config.json", revision=revision), str):
        return
    offline = ("model.path=/local/dir (a directory saved with save_pretrained), or run on the embedded default "
               "with `model=smollm2_135m hardware=cpu`")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise UserError(f"model.path={model_dir} is a Hugging Face hub id, it is not in the local cache and "
                        f"HF_HUB_OFFLINE is set; download it on a machine that is online and set {offline}")
    try:
        model_info(model_dir, revision=revision, timeout=timeout)
        auth_check(model_dir)
    except GatedRepoError:
        raise UserError(f"model.path={model_dir} is a gated model: accept its licence on huggingface.co with your "
                        "account, then `huggingface-cli login` (or set HF_TOKEN) on this machine and the cluster's "
                        "nodes") from None
    except RepositoryNotFoundError:
        raise UserError(f"model.path={model_dir}: no such model on the Hugging Face hub (or it is private and this "
                        "machine has no token for it); check the id, or point model.path at a local directory") \
            from None
    except Exception as e:  # noqa: BLE001 - connection errors of every kind mean the same thing here
        raise UserError(f"model.path={model_dir} is a Hugging Face hub id and the hub cannot be reached from this "
                        f"machine ({type(e).__name__}: {e}); if it is offline, download the model elsewhere and set "
                        f"{offline}. Gated models (Llama-2) also need `huggingface-cli login` with an account that "
                        "accepted the licence") from None


def check_data(cfg, tokenizer) -> tuple[list, dict, str]:
    """Build the training rows as a worker would (and return them), and load the test split the evaluation will
    read."""
    # imported here, not at the top: the command line imports check_storage and should stay light
    from distft.recipe import epoch_steps, training_rows

    train = training_rows(cfg, tokenizer)
    world = cfg.scaling.num_workers
    epoch_steps(cfg, len(train[0]), world=world, grad_accum=run_settings(cfg, world=world).grad_accum)
    if cfg.eval.enabled:
        d = cfg.data
        load_examples(d.name, d.path, "test", hub_id=d.hub_id, limit=1, system_prompt=d.system_prompt)
    return train


def check_storage(storage_path: str) -> None:
    """run.storage_path must be a directory this process can create files in (cloud URIs are checked by Ray)."""
    if is_uri(storage_path):
        return
    path = Path(storage_path).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    problem = None
    if existing is not None and not existing.is_dir():
        problem = f"{existing} is a file, not a directory"
    elif existing is None or not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing or path} is not writable by this user"
    else:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".distft_write_probe_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            problem = f"cannot create files there ({e.strerror})"
    if problem:
        raise ConfigError([f"run.storage_path={storage_path}: {problem}; set run.storage_path=DIR to a writable "
                           "directory (or a cloud URI such as s3://BUCKET/runs)"])
