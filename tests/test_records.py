"""Site data: formats, one clear error per problem (never quoting record text), split, batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client.split import split_records
from common.batches import IGNORE, batch_order, collate, tokenize
from common.config import load_config
from common.lengths import measure_lengths
from common.model import load_tokenizer
from common.records import DataError, InstructRecord, TextRecord, load_records

SECRET = "Canary Zebediah Quackenbush"  # stands in for patient text; must never be echoed
CLS = load_config()
LM = load_config({"model.task": "causal-lm"})


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _errors(path: Path, cfg=CLS) -> DataError:
    with pytest.raises(DataError) as info:
        load_records(path, cfg.model, cfg.data)
    assert SECRET not in str(info.value)
    return info.value


def test_jsonl_csv_and_parquet_give_the_same_records(tmp_path: Path) -> None:
    rows = [{"text": f"note {i} {SECRET}", "label": i % 2, "sex": "F"} for i in range(5)]
    jsonl = _write(tmp_path / "a.jsonl", [json.dumps(r) for r in rows])
    csv = tmp_path / "a.csv"
    csv.write_text("text,label,sex\n" + "".join(f'"{r["text"]}",{r["label"]},F\n' for r in rows))
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    loaded = [load_records(p, CLS.model, CLS.data) for p in (jsonl, csv, parquet)]
    texts = [[(r.text, r.label) for r in recs] for recs in loaded]
    assert texts[0] == texts[1] == texts[2]
    assert [r.row for r in loaded[0]] == [1, 2, 3, 4, 5]
    assert [r.row for r in loaded[1]] == [2, 3, 4, 5, 6]  # CSV rows count the header line


def test_label_names_map_names_and_indices(tmp_path: Path) -> None:
    cfg = load_config({"data.label-names": "no,yes"})
    path = _write(
        tmp_path / "a.jsonl",
        [
            json.dumps({"text": "a", "label": "yes"}),
            json.dumps({"text": "b", "label": "No"}),
            json.dumps({"text": "c", "label": 1}),
        ],
    )
    assert [r.label for r in load_records(path, cfg.model, cfg.data)] == [1, 0, 1]


def test_instruction_and_chat_records(tmp_path: Path) -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Risk?"},
            {"role": "assistant", "content": "High."},
        ]
    }
    path = _write(
        tmp_path / "i.jsonl", [json.dumps({"prompt": "Q?", "completion": "A."}), json.dumps(chat)]
    )
    first, second = load_records(path, LM.model, LM.data)
    assert isinstance(first, InstructRecord)
    assert first.segments == (("Q?", False), ("A.", True))
    assert [trained for _, trained in second.segments] == [False, False, False, False, False, True]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"text": "a", "label": 0}', '{"text": "b", "label": 1'], "line 2: not valid JSON"),
        (['["a", 0]'], "line 1: must be a JSON object, got list"),
        (['{"label": 0}'], 'line 1: field "text" missing'),
        (['{"text": "", "label": 0}'], 'line 1: "text" is empty'),
        (['{"text": 5, "label": 0}'], 'line 1: "text" must be a string, got int'),
        (['{"text": "x"}'], 'line 1: field "label" missing'),
        (['{"text": "x", "label": 7}'], 'line 1: "label" must be one of 0, 1; got 7'),
        ([json.dumps({"text": "x", "label": SECRET})], '"label" must be one of 0, 1; got a string'),
        (['{"text": "x", "label": null}'], 'line 1: "label" is missing or empty'),
        (['{"text": "x", "label": [1]}'], "got list"),
    ],
)
def test_each_classification_error_names_line_and_problem(
    tmp_path: Path, lines: list[str], expected: str
) -> None:
    lines = [line.replace('"x"', json.dumps(SECRET)) for line in lines]
    error = _errors(_write(tmp_path / "site.jsonl", lines))
    assert f"site.jsonl:{expected}" in str(error) or expected in str(error)
    assert "site.jsonl" in str(error)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "q"}, 'field "completion" missing'),
        ({"prompt": "q", "completion": " "}, '"completion" is empty'),
        ({"prompt": 3, "completion": "a"}, '"prompt" must be a string, got int'),
        ({"messages": []}, '"messages" must be a non-empty list'),
        ({"messages": [{"role": "user", "content": SECRET}]}, "no assistant message"),
        ({"messages": [{"role": "doctor", "content": SECRET}]}, '"messages[0].role" is not one'),
        ({"messages": [{"role": "assistant", "content": None}]}, 'content" must be a string'),
    ],
)
def test_each_instruction_error(tmp_path: Path, record: dict, expected: str) -> None:
    error = _errors(_write(tmp_path / "i.jsonl", [json.dumps(record)]), LM)
    assert expected in str(error)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    lines = [json.dumps({"text": SECRET, "label": 2 + i}) for i in range(30)] + ["{broken"]
    error = _errors(_write(tmp_path / "many.jsonl", lines))
    assert len(error.problems) == 31
    assert "line 31: not valid JSON" in error.problems[-1]
    assert "... and 11 more problems" in str(error)


def test_file_level_errors(tmp_path: Path) -> None:
    assert "file not found" in str(_errors(tmp_path / "nope.jsonl"))
    assert "unknown format '.txt'" in str(_errors(_write(tmp_path / "a.txt", ["x"])))
    assert "no records" in str(_errors(_write(tmp_path / "empty.jsonl", ["", "  "])))
    bad_utf8 = tmp_path / "latin.jsonl"
    bad_utf8.write_bytes(b'{"text": "caf\xe9", "label": 0}\n')
    assert "line 1: not valid UTF-8" in str(_errors(bad_utf8))
    ragged = tmp_path / "r.csv"
    ragged.write_text(f"text,label\n{SECRET},1,extra\n")
    assert "line 2: has 3 columns, the header has 2" in str(_errors(ragged))
    fake = tmp_path / "f.parquet"
    fake.write_bytes(b"PAR1 not really")
    assert "not a readable Parquet file" in str(_errors(fake))


def test_truncated_file_names_its_last_line(tmp_path: Path) -> None:
    full = "".join(json.dumps({"text": SECRET, "label": i % 2}) + "\n" for i in range(10))
    path = tmp_path / "cut.jsonl"
    path.write_text(full[: len(full) - 12])
    assert "line 10: not valid JSON" in str(_errors(path))


def test_split_is_seeded_stratified_and_complete() -> None:
    records = [TextRecord(row=i, text=str(i), label=int(i % 4 == 0)) for i in range(200)]
    a = split_records(records, 0.1, 0.2, seed=3)
    b = split_records(records, 0.1, 0.2, seed=3)
    c = split_records(records, 0.1, 0.2, seed=4)
    assert a == b and a != c
    rows = [r.row for part in (a.train, a.val, a.test) for r in part]
    assert sorted(rows) == list(range(200))
    assert (len(a.val), len(a.test)) == (20, 40)
    assert sum(r.label for r in a.val) == 5 and sum(r.label for r in a.test) == 10


def test_length_grouping_cuts_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 128, size=2000)

    def padded(batches: list[np.ndarray]) -> int:
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    grouped = batch_order(lengths, 16, shuffle=True, seed=0)
    plain = [rng.permutation(2000)[i : i + 16] for i in range(0, 2000, 16)]
    assert sorted(np.concatenate(grouped).tolist()) == list(range(2000))
    assert padded(grouped) < 0.8 * padded(plain)
    assert batch_order(lengths, 16, shuffle=True, seed=1)[0].tolist() != grouped[0].tolist()


def test_evaluation_batches_hold_one_length_each_so_nothing_is_padded() -> None:
    lengths = np.array([5, 9, 5, 7, 9, 9, 5, 12, 5, 5, 7])
    batches = batch_order(lengths, 3, shuffle=False)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert all(len(set(lengths[b].tolist())) == 1 and len(b) <= 3 for b in batches)
    assert [int(lengths[b[0]]) for b in batches] == [12, 9, 7, 5, 5]  # longest first
    assert [len(b) for b in batches] == [1, 3, 2, 3, 2]
    assert batch_order(np.array([], dtype=np.int64), 4, shuffle=False) == []


def test_lengths_count_the_records_truncation_cuts(minilm_dir: Path) -> None:
    tokenizer = load_tokenizer(minilm_dir)
    texts = ["short note", "a somewhat longer note about the patient " * 3, "word " * 300]
    records = [TextRecord(row=i + 1, text=t, label=0) for i, t in enumerate(texts)]
    full = [len(tokenizer(t)["input_ids"]) for t in texts]  # with [CLS] and [SEP]
    lengths = measure_lengths(records, tokenizer, max_length=16)
    assert lengths.over == sum(n > 16 for n in full) == 2 and lengths.longest == max(full)
    assert lengths.median == sorted(full)[1] and lengths.records == 3
    assert "2 of 3 records (67%) are longer than data.max-length 16 tokens" in lengths.summary()
    assert tokenize(records, tokenizer, 16).lengths.tolist() == [min(n, 16) for n in full]
    prompt = InstructRecord(row=1, segments=(("why " * 40, False), ("yes", True)))
    instruct = measure_lengths([prompt], tokenizer, max_length=16)
    assert instruct.over == 1 and "use the last 16 tokens" in instruct.summary()
    assert measure_lengths(records[:1], tokenizer, 16).over == 0


def test_head_tail_truncation_keeps_the_start_and_the_end_of_a_long_note(
    minilm_dir: Path,
) -> None:
    tokenizer = load_tokenizer(minilm_dir)
    words = [f"w{i}" for i in range(200)]
    note = TextRecord(row=1, text=" ".join(words) + " discharged home", label=1)
    short = TextRecord(row=2, text="stable", label=0)
    full = tokenizer(note.text)["input_ids"]
    data = tokenize([note, short], tokenizer, 32, truncation="head-tail")
    cut = data.input_ids[0]
    assert len(cut) == 32 and cut[:8] == full[:8] and cut[8:] == full[-24:]
    assert cut[0] == tokenizer.cls_token_id and cut[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(cut[-3:-1]) == "discharged home"
    assert data.input_ids[1] == tokenizer(short.text)["input_ids"]  # short records untouched
    head = tokenize([note], tokenizer, 32).input_ids[0]
    assert head == [*full[:31], tokenizer.sep_token_id]  # the default keeps the start only
    assert (
        "the first 8 and the last 24 tokens"
        in measure_lengths([note], tokenizer, 32, "head-tail").summary()
    )
    assert 'data.truncation = "head-tail"' in measure_lengths([note], tokenizer, 32).summary()
    with pytest.raises(ValueError, match="truncation must be one of head, head-tail"):
        tokenize([note], tokenizer, 32, truncation="tail")


def test_instruction_labels_cover_only_the_completion(minilm_dir: Path) -> None:
    tokenizer = load_tokenizer(minilm_dir)
    record = InstructRecord(row=1, segments=(("is the risk high ?", False), ("yes", True)))
    data = tokenize([record], tokenizer, max_length=64)
    ids, labels = data.input_ids[0], data.targets[0]
    trained = [i for i, t in zip(ids, labels, strict=True) if t != IGNORE]
    assert tokenizer.decode(trained) == "yes [SEP]"
    assert labels[: len(ids) - 2] == [IGNORE] * (len(ids) - 2)
    short = tokenize([record], tokenizer, max_length=3)
    assert len(short.input_ids[0]) == 3 and short.targets[0][-2:] == labels[-2:]


def test_collate_pads_dynamically(minilm_dir: Path) -> None:
    records = [TextRecord(1, "short note", 0), TextRecord(2, "a somewhat longer note here", 1)]
    data = tokenize(records, load_tokenizer(minilm_dir), max_length=64)
    batch = collate(data, np.array([0, 1]))
    assert batch["input_ids"].shape[1] == max(len(i) for i in data.input_ids)
    assert batch["attention_mask"].sum().item() == sum(len(i) for i in data.input_ids)
    assert batch["labels"].tolist() == [0, 1]


def test_repeated_problems_are_merged_and_task_mismatch_is_named(tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": SECRET, "completion": "yes"})] * 8
    error = _errors(_write(tmp_path / "i.jsonl", lines))
    assert len(error.problems) == 8
    text = str(error)
    assert 'i.jsonl:lines 1, 2, 3, 4, 5 and 3 more (8 rows): field "text" missing' in text
    assert "set model.task = causal-lm" in text
    error = _errors(_write(tmp_path / "c.jsonl", [json.dumps({"text": SECRET, "label": 1})]), LM)
    assert "set model.task = classification" in str(error)
