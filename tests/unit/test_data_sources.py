"""Loading and eager validation of GSM8K and generic JSONL data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distft.data.sources import Example, load_examples
from distft.errors import ConfigError, DataError

GSM8K_DIR = Path(__file__).resolve().parents[2].parent / "shared/data/gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").is_file(), reason="GSM8K not present")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def rows(*objs) -> list[str]:
    return [json.dumps(o) for o in objs]


GOOD_QA = {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}


# --- GSM8K -----------------------------------------------------------------------------------------


@needs_gsm8k
@pytest.mark.parametrize("split,count", [("train", 7473), ("test", 1319)])
def test_real_gsm8k_loads_every_row(split, count):
    examples = load_examples("gsm8k", str(GSM8K_DIR), split)
    assert len(examples) == count
    first = examples[0]
    assert first.messages[0]["role"] == "user" and first.messages[0]["content"].strip()
    assert len(first.messages) == 1
    assert "#### " in first.response
    assert first.origin == f"{GSM8K_DIR / f'{split}.jsonl'}:1"
    assert examples[-1].origin.endswith(f":{count}")


def test_gsm8k_row_becomes_user_turn_and_answer(tmp_path):
    write_lines(tmp_path / "train.jsonl", rows(GOOD_QA))
    [ex] = load_examples("gsm8k", str(tmp_path), "train")
    assert ex == Example(
        messages=({"role": "user", "content": "What is 2+3?"},),
        response="2+3=5\n#### 5",
        origin=f"{tmp_path / 'train.jsonl'}:1",
    )


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    write_lines(tmp_path / "train.jsonl", ["", rows(GOOD_QA)[0], "   ", rows(GOOD_QA)[0]])
    examples = load_examples("gsm8k", str(tmp_path), "train")
    assert [e.origin.rsplit(":", 1)[1] for e in examples] == ["2", "4"]


def test_bad_json_names_file_and_line(tmp_path):
    f = write_lines(
        tmp_path / "train.jsonl", [*rows(GOOD_QA), '{"question": "x", "answer": ', *rows(GOOD_QA)]
    )
    with pytest.raises(DataError) as err:
        load_examples("gsm8k", str(tmp_path), "train")
    msg = str(err.value)
    assert f"{f}:2: invalid JSON" in msg
    assert "one JSON object per line" in msg
    assert f"{f}:1" not in msg and f"{f}:3" not in msg


def test_missing_and_wrong_type_fields_are_all_reported(tmp_path):
    f = write_lines(
        tmp_path / "test.jsonl",
        rows(
            GOOD_QA,
            {"question": "q only"},
            {"question": 7, "answer": "a"},
            {"question": "q", "answer": "   "},
            ["not", "an", "object"],
        ),
    )
    with pytest.raises(DataError) as err:
        load_examples("gsm8k", str(tmp_path), "test")
    msg = str(err.value)
    assert "4 invalid row problem(s)" in msg
    assert f"{f}:2: missing field 'answer' (add a non-empty string 'answer')" in msg
    assert f"{f}:3: field 'question' must be a string, got int" in msg
    assert f"{f}:4: field 'answer' is empty" in msg
    assert f"{f}:5: row is a JSON list, not an object" in msg


def test_many_problems_list_twenty_and_count_the_rest(tmp_path):
    write_lines(tmp_path / "train.jsonl", ["{bad"] * 25)
    with pytest.raises(DataError) as err:
        load_examples("gsm8k", str(tmp_path), "train")
    msg = str(err.value)
    assert msg.count("invalid JSON") == 20
    assert ":20: invalid JSON" in msg and ":21: invalid JSON" not in msg
    assert "... and 5 more problem(s)" in msg


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_says_no_examples(tmp_path, content):
    f = tmp_path / "train.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=r"contains no examples") as err:
        load_examples("gsm8k", str(tmp_path), "train")
    assert str(f) in str(err.value)


def test_missing_split_file_names_path_and_expected_contents(tmp_path):
    write_lines(tmp_path / "train.jsonl", rows(GOOD_QA))
    with pytest.raises(DataError) as err:
        load_examples("gsm8k", str(tmp_path), "test")
    msg = str(err.value)
    assert str(tmp_path / "test.jsonl") in msg
    assert "directory holding test.jsonl" in msg
    assert "train.jsonl" in msg  # lists what is there


def test_nonexistent_path(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        load_examples("gsm8k", str(tmp_path / "nope"), "train")
    assert str(tmp_path / "nope") in str(err.value)


def test_gsm8k_hub_offline_says_to_set_data_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_examples("gsm8k", None, "train")
    msg = str(err.value)
    assert "openai/gsm8k" in msg and "cannot be reached" in msg
    assert "data.path=DIR" in msg and "train.jsonl/test.jsonl" in msg


def test_gsm8k_hub_rows_are_validated_with_hub_origins(monkeypatch):
    import datasets

    calls = []

    def fake(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [GOOD_QA, {"question": "q"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(DataError, match=r"my/gsm8k:test\[1\]: missing field 'answer'"):
        load_examples("gsm8k", None, "test", hub_id="my/gsm8k")
    assert calls == [("my/gsm8k", "main", "test")]


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset name 'alpaca'; valid names: gsm8k, jsonl"):
        load_examples("alpaca", str(tmp_path), "train")


def test_limit_and_system_prompt(tmp_path):
    write_lines(tmp_path / "train.jsonl", rows(*[{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]))
    examples = load_examples("gsm8k", str(tmp_path), "train", limit=2, system_prompt="Be brief.")
    assert [e.response for e in examples] == ["a0", "a1"]
    assert examples[0].messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q0"},
    )


def test_limit_applies_after_validating_everything(tmp_path):
    write_lines(tmp_path / "train.jsonl", [*rows(GOOD_QA, GOOD_QA), "{bad"])
    with pytest.raises(DataError, match=":3: invalid JSON"):
        load_examples("gsm8k", str(tmp_path), "train", limit=1)


@pytest.mark.parametrize("limit", [0, -1, True])
def test_bad_limit_is_a_config_error(tmp_path, limit):
    write_lines(tmp_path / "train.jsonl", rows(GOOD_QA))
    with pytest.raises(ConfigError, match="data.limit"):
        load_examples("gsm8k", str(tmp_path), "train", limit=limit)


# --- generic JSONL -----------------------------------------------------------------------------------


def test_jsonl_prompt_response_and_messages_rows(tmp_path):
    write_lines(
        tmp_path / "train.jsonl",
        rows(
            {"prompt": "Hi", "response": "Hello!"},
            {"prompt": "Hi", "response": "Hello!", "system": "Be kind.", "id": 3},
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "U1"},
                    {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "U2"},
                    {"role": "assistant", "content": "A2"},
                ]
            },
        ),
    )
    a, b, c = load_examples("jsonl", str(tmp_path), "train")
    assert a.messages == ({"role": "user", "content": "Hi"},) and a.response == "Hello!"
    assert b.messages == ({"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"})
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant", "user"]
    assert c.response == "A2"


def test_jsonl_system_prompt_does_not_override_a_rows_own(tmp_path):
    write_lines(
        tmp_path / "train.jsonl",
        rows({"prompt": "p", "response": "r", "system": "own"}, {"prompt": "p", "response": "r"}),
    )
    own, added = load_examples("jsonl", str(tmp_path), "train", system_prompt="global")
    assert own.messages[0]["content"] == "own" and len(own.messages) == 2
    assert added.messages[0] == {"role": "system", "content": "global"}


def test_jsonl_single_file_for_train_only(tmp_path):
    f = write_lines(tmp_path / "mydata.jsonl", rows({"prompt": "p", "response": "r"}))
    [ex] = load_examples("jsonl", str(f), "train")
    assert ex.origin == f"{f}:1"
    with pytest.raises(DataError, match="directory holding test.jsonl"):
        load_examples("jsonl", str(f), "test")
    with pytest.raises(DataError, match="directory holding train.jsonl"):
        load_examples("gsm8k", str(f), "train")


def test_jsonl_chat_problems_name_file_line_and_fix(tmp_path):
    f = write_lines(
        tmp_path / "train.jsonl",
        rows(
            {"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}]},
            {
                "messages": [
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "u2"},
                ]
            },
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
            {"messages": []},
            {"prompt": "p"},
            {"text": "x"},
            {
                "messages": [
                    {"role": "user", "content": "u"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            {"prompt": "p", "response": "r", "messages": []},
            {"prompt": "p", "response": "r"},
        ),
    )
    with pytest.raises(DataError) as err:
        load_examples("jsonl", str(tmp_path), "train")
    msg = str(err.value)
    assert f"{f}:1: messages[1] has invalid role 'bot' (use one of system, user, assistant)" in msg
    assert f"{f}:2: last message has role 'user' (the last message must be the assistant answer)" in msg
    assert f"{f}:3: the message before the final assistant answer must be a user turn" in msg
    assert f"{f}:4: messages[0] content must be a non-empty string" in msg
    assert f"{f}:5: 'messages' must be a non-empty list" in msg
    assert f"{f}:6: missing field 'response'" in msg
    assert f"{f}:7: row has neither 'prompt'/'response' nor 'messages'" in msg
    assert f"{f}:8: messages[1] is a system message after the first turn" in msg
    assert f"{f}:9: row has both 'messages' and 'prompt'" in msg
    assert f"{f}:10" not in msg
    assert "9 invalid row problem(s)" in msg
