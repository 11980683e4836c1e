"""The generation tasks: lm-evaluation-harness's two GSM8K rules, SQL exact/execution match, ViGGO meaning
representations, few-shot prompts, and each task's score rows (what paired tests read)."""

import pytest

from distft.data import format_prompt, load_examples, with_fewshot
from distft.data.sources import Example
from distft.eval import sql, viggo
from distft.eval.gsm8k import flexible_extract, strict_match
from distft.eval.tasks import get_task
from tests.conftest import sql_rows, viggo_rows, write_task_dir

GOLD = "Natalia sold 48/2 = 24 clips in May.\n#### 1,600"  # an answer field, as lm-eval's target sees it


@pytest.mark.parametrize("text,strict,flexible", [
    ("#### 1600", True, True),
    ("#### 1,600", True, True),  # commas are ignored on both sides
    ("#### $1,600", False, True),  # strict wants a digit or "-" right after "#### "; flexible's token keeps the $
    ("So the answer is 1600.", False, True),  # no marker: flexible takes the last number, its trailing "." dropped
    ("#### 1600.", True, True),
    ("####1600", False, True),  # strict needs the single space lm-eval's regex has
    ("1600 apples, then 12 more", False, False),  # flexible: the LAST number
    ("no numbers at all", False, False),  # both filters fall back to "[invalid]"
    ("#### 1600.00", False, False),  # only a trailing "." is ignored: "1600.00" is not "1600"
])
def test_lm_eval_gsm8k_rules_on_fixed_strings(text, strict, flexible):
    assert strict_match(text, GOLD) is strict
    assert flexible_extract(text, GOLD) is flexible


def test_lm_eval_rules_with_negative_numbers_and_where_distft_strict_disagrees():
    assert strict_match("#### -3", "#### -3") and flexible_extract("it is -3", "#### -3")
    assert not flexible_extract("it is 3", "#### -3")
    # distft's #### rule normalises "1600.00" to 1600 and accepts "#### $1,600"; lm-eval's strict-match does not
    task = get_task("gsm8k")
    scores = task.score(["#### $1,600", "#### 1600.00"], [Example(({"role": "user", "content": "q"},), GOLD, "t")] * 2)
    assert scores["gsm8k_accuracy"] == 1.0 and scores["gsm8k_strict_match"] == 0.0


def test_sql_normalisation_and_execution_match_on_a_filled_schema():
    gold, schema = "SELECT COUNT(*) FROM head WHERE age > 56", "CREATE TABLE head (age INTEGER, name VARCHAR)"
    assert sql.exact_match("select count( * )  from HEAD where age>56;", gold)
    assert not sql.exact_match("SELECT name FROM head WHERE name = 'Bob'", "SELECT name FROM head WHERE name = 'bob'")
    assert sql.extract_sql("```sql\nSELECT 1;\n```\nmore text") == "SELECT 1"
    assert sql.execution_match("SELECT count(*) FROM head AS h WHERE h.age > 56", gold, schema)
    assert not sql.execution_match("SELECT COUNT(*) FROM head WHERE age > 50", gold, schema)  # rows tell them apart
    assert not sql.execution_match("SELECT COUNT(*) FROM head", gold, schema)
    assert not sql.execution_match("SELECT COUNT(*) FROM nowhere", gold, schema)  # does not run
    ordered = "SELECT name FROM head ORDER BY age DESC"
    assert not sql.execution_match("SELECT name FROM head ORDER BY age", ordered, schema)


def test_viggo_exact_match_is_the_function_and_the_attribute_set():
    gold = "inform(name[Halo], genres[action, adventure], rating[good])"
    assert viggo.exact_match("inform(rating[Good], genres[adventure, action], name[halo])", gold)
    assert not viggo.exact_match("inform(name[Halo], genres[action])", gold)
    assert not viggo.exact_match("request(name[Halo], genres[action, adventure], rating[good])", gold)
    assert viggo.function_match("inform(name[x])", gold)
    assert viggo.parse("no meaning representation here") is None and not viggo.exact_match("", gold)


@pytest.mark.parametrize("task,rows,headline", [("sql", sql_rows, "sql_exact_match"),
                                                ("viggo", viggo_rows, "viggo_exact_match")])
def test_each_task_loads_its_rows_and_scores_per_example(task, rows, headline, tmp_path):
    data = write_task_dir(tmp_path, rows, train=6, test=4)
    examples = load_examples(task, str(data), "test")
    golds = [e.response for e in examples]
    outputs = [golds[0], golds[1] + " garbage", "", golds[3]]
    scores = get_task(task).score(outputs, examples)
    assert scores["task"] == task and scores["metric"] == headline and scores["num_examples"] == 4
    assert [r["correct"] for r in scores["per_example"]] == [True, task == "sql" and False, False, True]
    assert scores["accuracy"] == scores[headline] == scores["correct"] / 4
    if task == "sql":
        assert examples[0].meta["context"].startswith("CREATE TABLE")
        assert scores["per_example"][0]["execution_match"]


def test_a_task_row_with_a_missing_field_names_file_line_and_fix(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "SELECT 1"}\n')
    with pytest.raises(Exception, match=r"test.jsonl:1: missing field 'context'"):
        load_examples("sql", str(tmp_path), "test")


def test_fewshot_prompts_are_lm_eval_shaped_seeded_and_never_the_question_itself(tmp_path):
    train = [Example(({"role": "user", "content": f"q{i}"},), f"a{i}\n#### {i}", f"t{i}") for i in range(6)]
    test = [train[0], Example(({"role": "user", "content": "new"},), "#### 7", "x")]
    shots = with_fewshot(test, train, 2, seed=1234)
    assert shots == with_fewshot(test, train, 2, seed=1234) and shots != with_fewshot(test, train, 2, seed=1)
    assert all(len(e.messages) == 5 and e.messages[-1] == t.messages[-1] for e, t in zip(shots, test, strict=True))
    assert train[0].messages[0] not in shots[0].messages[:-1]
    prompt = format_prompt(None, shots[1].messages, "plain")
    first, second = shots[1].messages[0]["content"], shots[1].messages[2]["content"]
    assert prompt == (f"Question: {first}\nAnswer: {shots[1].messages[1]['content']}\n\n"
                      f"Question: {second}\nAnswer: {shots[1].messages[3]['content']}\n\nQuestion: new\nAnswer:")


def test_a_system_prompt_keeps_the_sql_schema_the_scorer_runs(tmp_path):
    data = write_task_dir(tmp_path, sql_rows, train=2, test=2)
    example = load_examples("sql", str(data), "test", system_prompt="You write SQL.")[0]
    assert example.messages[0]["role"] == "system" and example.meta["context"].startswith("CREATE TABLE")
    assert get_task("sql").score([example.response], [example])["sql_execution_match"] == 1.0
