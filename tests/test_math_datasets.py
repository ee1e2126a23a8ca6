"""Tests of treerpo.data.math_datasets on tmp files and on ../shared/data."""

import json
import logging
from pathlib import Path

import pytest

from treerpo.data.math_datasets import DatasetFormatError, Problem, format_math_prompt, load_problems

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"math data folder {DATA} is absent")

# records in the README; skipped: math_train has 2 null and 2 empty ("") answers
COUNTS = {
    "math_train.json": (7474, 4),
    "math500_test.jsonl": (500, 0),
    "aime24_test.jsonl": (30, 0),
    "amc23_test.jsonl": (40, 0),
    "minerva_math_test.jsonl": (272, 0),
    "olympiadbench_test.jsonl": (675, 0),
    "gsm8k_train.jsonl": (7473, 0),
    "gsm8k_test.jsonl": (1319, 0),
}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


# ----------------------------------------------------------------- shared data
@needs_data
def test_every_data_file_is_known():
    assert {p.name for p in DATA.glob("*.json*")} == set(COUNTS)


@needs_data
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_load_counts(name):
    records, skipped = COUNTS[name]
    problems = load_problems(DATA / name)
    assert len(problems) == records - skipped
    assert all(isinstance(p, Problem) and p.question and p.answer for p in problems)
    assert {p.source for p in problems} == {Path(name).stem}
    indices = [p.index for p in problems]
    assert indices == sorted(set(indices)) and indices[-1] < records


@needs_data
def test_known_golds():
    first = {name: load_problems(DATA / name)[0].answer for name in COUNTS}
    assert first["gsm8k_test.jsonl"] == "18"
    assert first["amc23_test.jsonl"] == "27"
    assert first["olympiadbench_test.jsonl"] == "2"
    assert first["math500_test.jsonl"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert first["minerva_math_test.jsonl"] == "1.6"
    assert load_problems(DATA / "minerva_math_test.jsonl")[1].answer == "4.5e33"
    math_train = {p.index for p in load_problems(DATA / "math_train.json")}
    assert not {886, 1009} & math_train  # the two null answers


@needs_data
def test_gsm8k_thousands_removed():
    raw = [json.loads(line) for line in (DATA / "gsm8k_test.jsonl").open()]
    problems = load_problems(DATA / "gsm8k_test.jsonl")
    with_commas = [i for i, r in enumerate(raw) if "," in r["answer"].split("####")[-1]]
    assert len(with_commas) == 14
    for i in with_commas:
        assert problems[i].answer == raw[i]["answer"].split("####")[-1].strip().replace(",", "")
    assert all(p.answer.lstrip("-").isdigit() for p in problems)


# ------------------------------------------------------------------ formats
def test_all_formats_in_one_file(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"problem": "p0", "answer": 27.0},
            {"problem": "p1", "answer": 2.5},
            {"problem": "p2", "solution": r"so \boxed{1} or rather \boxed{\frac{1}{2}}."},
            "",
            {"question": "q3", "final_answer": ["$x^{2}$"]},
            {"question": "q4", "answer": "3 * 500 = <<3*500=1500>>1500\n#### 1,500"},
            {"problem": "p5", "answer": None},
            {"question": "q6", "final_answer": ["$69$,$84$"]},
            {"problem": "p7", "answer": " 025 "},
        ],
    )
    with caplog.at_level(logging.WARNING):
        problems = load_problems(path)
    assert [(p.question, p.answer, p.index) for p in problems] == [
        ("p0", "27", 0),
        ("p1", "2.5", 1),
        ("p2", r"\frac{1}{2}", 2),
        ("q3", "x^{2}", 3),
        ("q4", "1500", 4),
        ("q6", "$69$,$84$", 6),
        ("p7", "025", 7),
    ]
    assert {p.source for p in problems} == {"mixed"}
    assert "skipped 1 of 8" in caplog.text and str(path) in caplog.text


def test_json_array(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}]))
    assert load_problems(path) == [Problem("a", "1", "arr", 0)]


def test_malformed_jsonl_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"problem": "a", "answer": "1"},
            {"problem": "b", "answer": "2"},
            '{"problem": "c", "answer": ',
            {"problem": "d", "answer": "4"},
        ],
    )
    with pytest.raises(DatasetFormatError) as err:
        load_problems(path)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "invalid JSON" in msg
    assert isinstance(err.value, ValueError)


def test_malformed_json_array(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"problem": "a", "answer": "1"},\n{"problem": \n]')
    with pytest.raises(DatasetFormatError, match="line 4"):
        load_problems(path)
    path.write_text('{"problem": "a", "answer": "1"}')
    with pytest.raises(DatasetFormatError, match="JSON array"):
        load_problems(path)


def test_unknown_record_format(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"problem": "a", "answer": "1"}, {"prompt": "b", "target": "2"}])
    with pytest.raises(DatasetFormatError) as err:
        load_problems(path)
    msg = str(err.value)
    assert str(path) in msg and "line 2" in msg and "['prompt', 'target']" in msg
    for combo in (
        "'problem' + 'answer'",
        "'problem' + 'solution'",
        "'question' + 'final_answer'",
        "'question' + 'answer'",
    ):
        assert combo in msg


def test_question_answer_without_marker(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "just 3"}])
    with pytest.raises(DatasetFormatError, match="####"):
        load_problems(path)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(DatasetFormatError, match="unsupported file type"):
        load_problems(tmp_path / "x.csv")


# ------------------------------------------------------------------- prompts
def test_plain_prompt():
    assert format_math_prompt("What is 1+1?") == (
        "Question: What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.\nAnswer:"
    )


def test_chat_prompt():
    class FakeTokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, **kwargs):
            self.call = (messages, kwargs)
            return "<chat>"

    tok = FakeTokenizer()
    assert format_math_prompt("What is 1+1?", tok) == "<chat>"
    messages, kwargs = tok.call
    assert messages == [
        {
            "role": "user",
            "content": "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.",
        }
    ]
    assert kwargs == {"add_generation_prompt": True, "tokenize": False}
    tok.chat_template = None
    assert format_math_prompt("q", tok).startswith("Question: q\n")
