"""A site's records: read from JSONL, CSV or Parquet and validated, with errors that name the
file and line but never quote a record's content (it may hold patient text)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import DataSettings, ModelSettings

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")
INPUT_FIELDS = ("text", "label", "prompt", "completion", "messages")
"""Fields a model reads (or learns from); any other field of a record is an extra."""
MAX_PROBLEMS_SHOWN = 20


class DataError(ValueError):
    """A data file is missing, unreadable or holds invalid records; one line per problem."""

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        lines = [f"{path.name}:{p}" for p in _grouped(self.problems)]
        shown = lines[:MAX_PROBLEMS_SHOWN]
        more = len(lines) - len(shown)
        tail = [f"... and {more} more problems"] if more > 0 else []
        head = f"{path}: {len(self.problems)} problem(s) in the data"
        super().__init__("\n  ".join([head, *shown, *tail]))


def _grouped(problems: Sequence[str]) -> list[str]:
    """Merge rows that share one message: "lines 1, 2, 3 and 40 more (43 rows): ..."."""
    places: dict[str, list[str]] = {}
    for problem in problems:
        where, _, message = problem.partition(": ")
        places.setdefault(message, []).append(where)
    merged = []
    for message, wheres in places.items():
        if len(wheres) == 1:
            merged.append(f"{wheres[0]}: {message}")
            continue
        unit = wheres[0].split(" ")[0]
        numbers = ", ".join(w.split(" ", 1)[-1] for w in wheres[:5])
        rest = f" and {len(wheres) - 5} more" if len(wheres) > 5 else ""
        merged.append(f"{unit}s {numbers}{rest} ({len(wheres)} rows): {message}")
    return merged


Extra = str | int | float | bool
"""The value of an extra field kept with a record (an `id`, a group such as `age_band`)."""


@dataclass(frozen=True)
class TextRecord:
    """A classification record: note text and class index (None: unlabelled, to predict)."""

    row: int
    text: str
    label: int | None
    extra: dict[str, Extra] = field(default_factory=dict, hash=False)
    """The extra fields asked for by name (`keep`), where the record has them."""


@dataclass(frozen=True)
class InstructRecord:
    """An instruction record as text segments, each marked whether the loss applies to it.
    An unlabelled record (to predict) ends with the prompt that its completion follows."""

    row: int
    segments: tuple[tuple[str, bool], ...]
    extra: dict[str, Extra] = field(default_factory=dict, hash=False)
    """The extra fields asked for by name (`keep`), where the record has them."""


Record = TextRecord | InstructRecord


@dataclass(frozen=True)
class Row:
    """One raw record and where it stands in the file (`where` is "line 7" or "row 7")."""

    number: int
    where: str
    fields: dict[str, Any] | None
    problem: str | None = None


def read_rows(path: Path) -> Iterator[Row]:
    """Yield the raw records of a file; a row that cannot be parsed carries its problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, ["file not found" if not path.exists() else "not a regular file"])
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(path, [f"unknown format {path.suffix!r}; use one of {sorted(FORMATS)}"])
    reader = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[fmt]
    yield from reader(path)


def load_records(
    path: Path,
    model: ModelSettings,
    data: DataSettings,
    *,
    labelled: bool = True,
    keep: Sequence[str] = (),
) -> list[Record]:
    """Read and validate every record of a file; raises DataError listing every problem.

    `labelled=False` reads records to predict: classification needs `text` only, instruction
    records a `prompt` or `messages` ending in a user message. `keep` names extra fields to
    carry on each record (`Record.extra`); they must be strings, numbers or booleans.
    """
    path = Path(path)
    records, problems = validate_rows(read_rows(path), model, data, labelled=labelled, keep=keep)
    if not problems and not records:
        problems = ["no records in the file"]
    if problems:
        raise DataError(path, problems)
    return records


def validate_rows(
    rows: Iterator[Row],
    model: ModelSettings,
    data: DataSettings,
    *,
    labelled: bool = True,
    keep: Sequence[str] = (),
) -> tuple[list[Record], list[str]]:
    """Turn raw rows into records, collecting one problem per bad row ("line 7: ...")."""
    labels = _LabelMap(model.num_labels, data.label_list) if labelled else None
    records: list[Record] = []
    problems: list[str] = []
    for row in rows:
        try:
            if row.problem is not None:
                raise ValueError(row.problem)
            assert row.fields is not None
            extra = _extra(row.fields, keep)
            if model.task == "classification":
                records.append(_text_record(row, labels, extra))
            else:
                records.append(_instruct_record(row, labelled, extra))
        except ValueError as e:
            problems.append(f"{row.where}: {e}")
    return records, problems


def string_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Every string value of a raw record by field name, chat contents flattened."""
    out: dict[str, str] = {}
    for name, value in fields.items():
        if isinstance(value, str):
            out[name] = value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    for k, v in item.items():
                        if isinstance(v, str):
                            out[f"{name}[{i}].{k}"] = v
    return out


class _LabelMap:
    def __init__(self, num_labels: int, names: list[str]) -> None:
        self.num_labels = num_labels
        self.index = {n.lower(): i for i, n in enumerate(names)}
        self.allowed = ", ".join(names) if names else ", ".join(map(str, range(num_labels)))

    def __call__(self, value: Any) -> int:
        if isinstance(value, bool) and self.num_labels == 2:
            return int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            key = value.strip().lower()
            if key in self.index:
                return self.index[key]
            if key.lstrip("-").isdigit():
                value = int(key)
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < self.num_labels:
                return value
            raise ValueError(f'"label" must be one of {self.allowed}; got {value}')
        if value is None or value == "":
            raise ValueError('"label" is missing or empty')
        kind = f"a string of {len(value)} characters" if isinstance(value, str) else _kind(value)
        raise ValueError(f'"label" must be one of {self.allowed}; got {kind}')


def _extra(fields: Mapping[str, Any], keep: Sequence[str]) -> dict[str, Extra]:
    extra = {}
    for name in keep:
        value = fields.get(name)
        if value is None or value == "":  # absent, JSON null, or an empty CSV cell
            continue
        if not isinstance(value, Extra):
            raise ValueError(f'"{name}" must be a string, number or boolean, got {_kind(value)}')
        extra[name] = value
    return extra


def _text_record(row: Row, labels: _LabelMap | None, extra: dict[str, Extra]) -> TextRecord:
    fields = row.fields or {}
    text = fields.get("text")
    if "text" not in fields:
        hint = "records to predict need text"
        if labels is not None:
            hint = "classification records need text and label"
        if "prompt" in fields or "messages" in fields:
            hint = "these look like instruction records: set model.task = causal-lm"
        raise ValueError(_missing("text", fields, hint))
    if not isinstance(text, str):
        raise ValueError(f'"text" must be a string, got {_kind(text)}')
    if not text.strip():
        raise ValueError('"text" is empty')
    if labels is None:
        return TextRecord(row=row.number, text=text, label=None, extra=extra)
    if "label" not in fields:
        raise ValueError(_missing("label", fields, "classification records need text and label"))
    return TextRecord(row=row.number, text=text, label=labels(fields["label"]), extra=extra)


def _instruct_record(row: Row, labelled: bool, extra: dict[str, Extra]) -> InstructRecord:
    fields = row.fields or {}
    if "messages" in fields:
        segments = _chat_segments(fields["messages"], labelled)
        return InstructRecord(row=row.number, segments=segments, extra=extra)
    for key in ("prompt", "completion") if labelled else ("prompt",):
        if key not in fields:
            hint = 'instruction records need "prompt" and "completion", or "messages"'
            if not labelled:
                hint = 'records to predict need "prompt", or "messages" ending in a user message'
            if "text" in fields and "label" in fields:
                hint = "these look like classification records: set model.task = classification"
            raise ValueError(_missing(key, fields, hint))
        if not isinstance(fields[key], str):
            raise ValueError(f'"{key}" must be a string, got {_kind(fields[key])}')
    if not labelled:
        if not fields["prompt"].strip():
            raise ValueError('"prompt" is empty')
        return InstructRecord(row=row.number, segments=((fields["prompt"], False),), extra=extra)
    if not fields["completion"].strip():
        raise ValueError('"completion" is empty')
    return InstructRecord(
        row=row.number,
        segments=((fields["prompt"], False), (fields["completion"], True)),
        extra=extra,
    )


def _chat_segments(messages: Any, labelled: bool = True) -> tuple[tuple[str, bool], ...]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"messages" must be a non-empty list, got {_kind(messages)}')
    segments = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f'"messages[{i}]" must be an object, got {_kind(message)}')
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            shown = "missing" if role is None else f"not one of {', '.join(ROLES)}"
            raise ValueError(f'"messages[{i}].role" is {shown}')
        if not isinstance(content, str):
            raise ValueError(f'"messages[{i}].content" must be a string, got {_kind(content)}')
        # One plain template for every model, so training and inference agree.
        segments.append((f"<|{role}|>\n", False))
        segments.append((f"{content}\n", role == "assistant"))
    if not labelled:
        # To predict the reply: the conversation so far, then the assistant turn's header.
        if messages[-1].get("role") != "user":
            raise ValueError(f'"messages" must end with a user message, got {messages[-1]["role"]}')
        return (*segments, ("<|assistant|>\n", False))
    if not any(trained for _, trained in segments):
        raise ValueError('"messages" has no assistant message to learn from')
    return tuple(segments)


def _missing(key: str, fields: Mapping[str, Any], hint: str) -> str:
    present = ", ".join(sorted(map(str, fields))) or "none"
    return f'field "{key}" missing ({hint}); fields present: {present}'


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Row(number, where, None, f"not valid UTF-8 (byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as e:
                yield Row(number, where, None, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(fields, dict):
                yield Row(number, where, None, f"must be a JSON object, got {_kind(fields)}")
                continue
            yield Row(number, where, fields)


def _csv_rows(path: Path) -> Iterator[Row]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            names = [h.strip() for h in header]
            start = reader.line_num + 1
            for values in reader:
                where = f"line {start}"
                if values and any(v.strip() for v in values):
                    if len(values) != len(names):
                        problem = f"has {len(values)} columns, the header has {len(names)}"
                        yield Row(start, where, None, problem)
                    else:
                        yield Row(start, where, dict(zip(names, values, strict=True)))
                start = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise DataError(path, [f"not valid UTF-8 (byte {e.start}); save the file as UTF-8"]) from e
    except csv.Error as e:
        raise DataError(path, [f"line {reader.line_num}: not valid CSV ({e})"]) from e


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(path, [f"not a readable Parquet file ({type(e).__name__})"]) from e
    for number, fields in enumerate(table.to_pylist(), start=1):
        yield Row(number, f"row {number}", fields)
