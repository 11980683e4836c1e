"""Bad inputs a user types, each with the words its refusal must contain (the problem and the fix). Shared by
tests/cli/test_bad_inputs.py (exit code, no traceback, no Ray, nothing saved lost) and bench/bench_refusals.py
(time-to-refusal table in docs/bad_inputs.md)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

GOOD_ROW = {"question": "Tom has 3 apples and buys 2 more. How many apples?", "answer": "3 + 2 = 5\n#### 5"}


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # {data} {runs} {tmp} are filled in; train cases get BASE first
    expect: tuple[str, ...]  # substrings of the message
    files: dict = field(default_factory=dict)  # relative path under tmp -> text (or rows: list of dicts / str)
    tool: str = "train"  # train | eval | report
    base: bool = True


def rows(*items, n: int = 0) -> str:
    """JSONL text of `items` (dicts dumped, strings kept as lines), after `n` good rows."""
    lines = [json.dumps(GOOD_ROW)] * n + [i if isinstance(i, str) else json.dumps(i) for i in items]
    return "\n".join(lines) + "\n"


GOOD = rows(n=8)
GOOD_DATA = {"data/train.jsonl": GOOD, "data/test.jsonl": GOOD}
BASE = ("+experiment=gsm8k_lora", "model=tiny_llama", "hardware=cpu", "data.path={data}", "run.storage_path={runs}",
        "run.name=case", "trainer.max_steps=2", "data.seq_len=128")

CASES = [
    # config typos, one per group, and added keys
    Case("typo-trainer", ("trainer.lrr=1e-4",), ("unknown config key trainer.lrr", "did you mean trainer.lr")),
    Case("typo-method", ("method.lora_rr=8",), ("unknown config key method.lora_rr", "method.lora_r")),
    Case("typo-strategy", ("strategy.zero_stag=3",), ("strategy.zero_stag", "strategy.zero_stage")),
    Case("typo-data", ("data.seq_length=128",), ("data.seq_length", "data.seq_len")),
    Case("typo-model", ("model.hidden=64",), ("model.hidden", "model.hidden_size")),
    Case("typo-scaling", ("scaling.num_worker=2",), ("scaling.num_worker", "scaling.num_workers")),
    Case("typo-run", ("run.nmae=x",), ("run.nmae", "run.name")),
    Case("typo-eval", ("eval.enable=false",), ("eval.enable", "eval.enabled")),
    Case("deepspeed-without-plus",  # {{ }}: the arguments are format strings
         ("strategy=zero3", "strategy.deepspeed={{zero_optimization:{{stage3_max_live_parameters:1}}}}"),
         ("strategy.deepspeed takes any keys", "+strategy.deepspeed={zero_optimization:")),
    Case("added-key", ("+trainer.lrr=1e-4",), ("unknown config key trainer.lrr", "did you mean trainer.lr",
                                               "remove the leading +")),
    # wrong types, unknown group choices
    Case("type-float", ("trainer.lr=fast",), ("trainer.lr", "could not be converted to Float")),
    Case("type-int", ("scaling.num_workers=two",), ("scaling.num_workers", "could not be converted to Integer")),
    Case("choice-model", ("model=llama3_8b",), ("model=llama3_8b is not a config", "choices:", "tiny_llama")),
    Case("choice-strategy", ("strategy=zero4",), ("strategy=zero4 is not a config", "did you mean strategy=zero")),
    Case("choice-experiment", ("+experiment=gsm8k_lorra",), ("did you mean experiment=gsm8k_lora",), base=False),
    # cross-field checks
    Case("num-workers-0", ("scaling.num_workers=0",), ("scaling.num_workers=0 must be at least 1",)),
    Case("batch-divide", ("trainer.global_batch_size=3",), ("trainer.global_batch_size=3 is not a multiple",
                                                            "use trainer.global_batch_size=2 or 4")),
    Case("lr-zero", ("trainer.lr=0",), ("trainer.lr=0.0 must be positive",)),
    Case("gpu-on-cpu", ("hardware=gpu_1x",), ("asks for 1 GPUs", "the Ray cluster has 0", "hardware=cpu")),
    Case("qlora-4bit", ("method=qlora", "model.supports_4bit=false"), ("cannot be loaded in 4-bit", "method=lora")),
    # the plan before launching: a run the planner says does not fit is refused with a same-method alternative
    Case("plan-does-not-fit", ("method=full", "hardware.host_memory_gb=1.58"),
         ("the plan says this run does not fit", "0.80 GiB per worker", "hardware.host_memory_gb=1.58",
          "Fits with the same method (full): strategy=fsdp", "plan.enforce=false")),
    Case("plan-compare-arm", ("+experiment=gsm8k_compare", "model=tiny_llama", "hardware=cpu", "data.path={data}",
                              "run.storage_path={runs}", "data.seq_len=128", "hardware.host_memory_gb=1.58",
                              "compare.arms.full.overrides=[]"),
         ("compare.arms.full: the plan says this run does not fit", "strategy=fsdp", "plan.enforce=false"),
         base=False),
    # data files
    Case("data-missing", ("data.path={tmp}/nope",), ("data.path=", "nope does not exist", "train.jsonl")),
    Case("data-bad-json", (), ("train.jsonl:4: invalid JSON", "write one JSON object per line"),
         files={"data/train.jsonl": rows('{"question": "x", ', n=3), "data/test.jsonl": GOOD}),
    Case("data-empty", (), ("train.jsonl contains no examples",),
         files={"data/train.jsonl": "\n", "data/test.jsonl": GOOD}),
    Case("data-no-answer", (), ("train.jsonl:3: missing field 'answer'",),
         files={"data/train.jsonl": rows({"question": "q"}, n=2), "data/test.jsonl": GOOD}),
    Case("data-no-test-split", (), ("test.jsonl: file not found", "data.path="),
         files={"data/train.jsonl": GOOD}),
    Case("jsonl-prompt-no-response", ("data=jsonl",), ("train.jsonl:2: missing field 'response'",),
         files={"data/train.jsonl": rows({"prompt": "a", "response": "b"}, {"prompt": "only a prompt"}),
                "data/test.jsonl": rows({"prompt": "a", "response": "b"})}),
    Case("jsonl-messages-bad-role", ("data=jsonl",), ("messages[1] has invalid role 'bot'", "use one of system"),
         files={"data/train.jsonl": rows({"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "bot", "content": "hello"}]}),
                "data/test.jsonl": rows({"prompt": "a", "response": "b"})}),
    Case("jsonl-messages-last-user", ("data=jsonl",), ("the last message must be the assistant answer",),
         files={"data/train.jsonl": rows({"messages": [{"role": "user", "content": "hi"}]}),
                "data/test.jsonl": rows({"prompt": "a", "response": "b"})}),
    Case("all-too-long", ("data.seq_len=16",), ("all 8 examples are longer than data.seq_len=16",
                                                "raise data.seq_len")),
    Case("too-few-rows", ("data.max_train_examples=1",), ("1 training rows cannot fill one step", "lower trainer.global_batch_size")),
    # model, storage, resume, an already completed run
    Case("model-dir-missing", ("model=llama2_7b", "model.path={tmp}/no-such-model"),
         ("model.path=", "no-such-model does not exist", "local model directory")),
    Case("model-dir-not-a-model", ("model=llama2_7b", "model.path={tmp}/data"), ("has no config.json",)),
    Case("hub-offline", ("model=llama2_7b",), ("meta-llama/Llama-2-7b-hf", "cannot be reached",
                                               "huggingface-cli login")),
    Case("storage-unwritable", ("run.storage_path=/proc/distft-runs",), ("run.storage_path=/proc/distft-runs",
                                                                           "writable directory")),
    Case("storage-is-a-file", ("run.storage_path={tmp}/data/train.jsonl",), ("is a file, not a directory",)),
    Case("resume-incomplete", ("run.resume_from={tmp}/half",), ("run.resume_from=", "is not a usable checkpoint",
                                                               "checkpoint_NNNNNN"),
         files={"half/rank0_state.pt": "x"}),
    Case("already-completed", (), ("run 'case' already completed", "pick a new run.name"),
         files={"runs/case/summary.json": json.dumps({"status": "completed"})}),
    # a compare arm with a bad override
    Case("compare-arm-override", ("+experiment=gsm8k_compare", "model=tiny_llama", "hardware=cpu",
                                  "data.path={data}", "run.storage_path={runs}",
                                  "compare.arms.lora.overrides=['trainer.lrr=1']"),
         ("compare.arms.lora: unknown config key trainer.lrr", "did you mean trainer.lr"), base=False),
    # the other commands
    Case("eval-not-an-export", ("{tmp}/data",), ("is not an export", "export/ directory"), tool="eval", base=False),
    Case("report-empty-dir", ("{tmp}/empty",), ("holds no run directories",), files={"empty/.keep": ""},
         tool="report", base=False),
]

MODULES = {"train": "distft.train", "eval": "distft.eval", "report": "distft.report"}


def prepare(case: Case, tmp: Path) -> list[str]:
    """Write the case's files under `tmp` (good data unless it brings its own) and return its argv after -m."""
    files = dict(GOOD_DATA)
    if any(k.startswith("data/") for k in case.files):
        files = {k: v for k, v in files.items() if k not in ("data/train.jsonl", "data/test.jsonl")}
    files.update(case.files)
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    (tmp / "runs" / "case").mkdir(parents=True, exist_ok=True)
    (tmp / "runs" / "case" / "saved.txt").write_text("an earlier run's file")
    fill = {"data": tmp / "data", "runs": tmp / "runs", "tmp": tmp}
    keys = {a.split("=", 1)[0].lstrip("+") for a in case.args}
    base = [a for a in BASE if a.split("=", 1)[0].lstrip("+") not in keys] if case.base else []
    args = [*base, *case.args]
    return [MODULES[case.tool], *(a.format(**fill) for a in args)]
