"""Loading math benchmark files (MATH, MATH-500, AIME, AMC, Minerva, OlympiadBench, GSM8K)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from treerpo.rewards.math_verify_reward import extract_boxed

logger = logging.getLogger(__name__)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
ACCEPTED_FORMATS = (
    "'problem' + 'answer' (MATH, MATH-500, AIME, AMC); "
    "'problem' + 'solution' with a \\boxed{} answer (Minerva); "
    "'question' + 'final_answer' list (OlympiadBench); "
    "'question' + 'answer' containing '#### <answer>' (GSM8K)"
)
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+")
_MISSING = object()  # the record's format is known but it holds no gold answer


class DatasetFormatError(ValueError):
    """A data file or record is not in a supported format."""


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    source: str
    index: int


def _answer_str(value) -> str:
    """Gold answer as text: 27.0 -> "27", other floats via str()."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _strip_dollars(text: str) -> str:
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] == "$" and t.count("$") == 2:
        return t[1:-1].strip()
    return t


def _gold(record: dict, where: str):
    """(question, gold) of a record, gold may be _MISSING; raises on unknown formats."""
    if not isinstance(record, dict):
        raise DatasetFormatError(
            f"{where}: expected a JSON object, got {type(record).__name__}. "
            f"Accepted field combinations: {ACCEPTED_FORMATS}"
        )
    if "problem" in record and "answer" in record:
        ans = record["answer"]
        return record["problem"], _MISSING if ans is None else _answer_str(ans)
    if "problem" in record and "solution" in record:
        boxed = extract_boxed(record["solution"] or "")
        return record["problem"], _MISSING if boxed is None else boxed.strip()
    if "question" in record and "final_answer" in record:
        ans = record["final_answer"]
        if isinstance(ans, list):
            ans = ans[0] if ans else None
        return record["question"], _MISSING if ans is None else _strip_dollars(_answer_str(ans))
    if "question" in record and "answer" in record:
        ans = record["answer"]
        if ans is None:
            return record["question"], _MISSING
        if isinstance(ans, str) and "####" in ans:
            ans = ans.split("####")[-1].strip()
            return record["question"], ans.replace(",", "") if _THOUSANDS_RE.fullmatch(ans) else ans
        raise DatasetFormatError(
            f"{where}: 'question' + 'answer' record whose answer has no "
            f"'#### <final answer>' marker (GSM8K format). "
            f"Accepted field combinations: {ACCEPTED_FORMATS}"
        )
    raise DatasetFormatError(
        f"{where}: unknown record format with keys {sorted(record)}. Accepted field combinations: {ACCEPTED_FORMATS}"
    )


def _read_records(path: Path) -> list[tuple[str, object]]:
    """(location, record) pairs of a .jsonl or .json file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetFormatError(
            f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r}); "
            "a math data file is .jsonl (one JSON object a line) or .json text"
        ) from None
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}: line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DatasetFormatError(
                    f"{path}: line {n}: invalid JSON ({e.msg} at column {e.colno}). Each "
                    f"non-blank line of a .jsonl file must be one complete JSON object: "
                    f"fix or delete that line."
                ) from None
        return out
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(
                f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column "
                f"{e.colno}). A .json file must hold one JSON array of "
                f"records: fix the file."
            ) from None
        if not isinstance(data, list):
            raise DatasetFormatError(
                f"{path}: a .json file must hold a JSON array of records, "
                f"got {type(data).__name__}. Use a list, or one object "
                f"per line in a .jsonl file."
            )
        return [(f"{path}: record {n} (1-based)", r) for n, r in enumerate(data, 1)]
    raise DatasetFormatError(
        f"{path}: unsupported file type {path.suffix!r}; use .jsonl (one JSON object per line) or .json (a JSON array)."
    )


def load_problems(path) -> list[Problem]:
    """Problems of a math data file; records with a null or empty gold are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"math data file not found: {path}")
    problems, skipped = [], 0
    for index, (where, record) in enumerate(_read_records(path)):
        question, gold = _gold(record, where)
        if gold is _MISSING or not gold:
            skipped += 1
            continue
        problems.append(Problem(str(question), gold, path.stem, index))
    if not problems:
        raise DatasetFormatError(
            f"{path}: holds no problems with a gold answer ({skipped} records without one); "
            f"give a file with records in one of the accepted formats: {ACCEPTED_FORMATS}"
        )
    if skipped:
        logger.warning(
            "%s: skipped %d of %d records without a gold answer (null/empty)", path, skipped, skipped + len(problems)
        )
    return problems


def format_math_prompt(question: str, tokenizer=None, examples: tuple[tuple[str, str], ...] = ()) -> str:
    """Prompt asking for step-by-step reasoning and a boxed final answer, after the worked ``examples`` (question,
    answer) if any: earlier chat turns, or earlier Question/Answer pairs without a chat template."""
    if getattr(tokenizer, "chat_template", None):
        messages = []
        for q, a in examples:
            messages += [{"role": "user", "content": f"{q}\n{INSTRUCTION}"}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": f"{question}\n{INSTRUCTION}"})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    shots = "".join(f"Question: {q}\n{INSTRUCTION}\nAnswer: {a}\n\n" for q, a in examples)
    return f"{shots}Question: {question}\n{INSTRUCTION}\nAnswer:"
