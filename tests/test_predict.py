"""`fedtune-site predict` and `evaluate`: an adapter used at a site, checked against PEFT's own
loading (`PeftModel.from_pretrained`) and against `common.evaluation.evaluate` on each subset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CANARY, plant_canary, write_jsonl
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from client.cli import EXIT_INVALID, EXIT_OK, main
from client.inference import Sampling, load_inputs, predict
from common.adapter import get_adapter_state, load_adapter, save_adapter
from common.batches import Tokenized
from common.config import load_config
from common.evaluation import evaluate, load_eval_file, score
from common.model import build_model, load_adapted_model, load_tokenizer
from common.records import DataError

MAX_LENGTH = 32


def _make_adapter(out: Path, keys: dict[str, object], seed: int = 1) -> Path:
    """An adapter with random LoRA factors (B non-zero, so that it changes the model) and
    head, saved in PEFT layout as a run does."""
    model = build_model(load_config(keys))
    generator = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=generator) * 0.3
        for k, v in get_adapter_state(model).items()
    }
    save_adapter(state, model.peft_config["default"], out)
    return out


@pytest.fixture
def bert_adapter(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    """Rank 4, alpha 8 on key,query,value: none of it the defaults, which `predict` must read
    from the adapter, not from its settings."""
    keys = {
        "model.path": str(tiny_bert_dir),
        "lora.rank": 4,
        "lora.alpha": 8,
        "lora.target-modules": "key,query,value",
    }
    return _make_adapter(tmp_path / "bert-adapter", keys)


@pytest.fixture
def llama_adapter(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    keys = {
        "model.path": str(tiny_llama_dir),
        "model.task": "causal-lm",
        "lora.rank": 4,
        "lora.target-modules": "q_proj,v_proj",
    }
    return _make_adapter(tmp_path / "llama-adapter", keys)


def _site_config(path: Path, model_dir: Path, *lines: str) -> Path:
    """Settings a site has: the base model and data settings, no LoRA shape; fp32, as the
    references these tests compare with compute in (`auto` is bf16 on a GPU)."""
    text = (
        f'model.path = "{model_dir}"\ndata.max-length = {MAX_LENGTH}\nmodel.precision = "fp32"\n'
        + "".join(f"{line}\n" for line in lines)
    )
    path.write_text(text)
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reference_classifier(model_dir: Path, adapter: Path, num_labels: int = 2) -> PeftModel:
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    return PeftModel.from_pretrained(base, adapter).eval()


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_records_to_predict_need_no_label_and_keep_only_the_fields_asked_for(
    tmp_path: Path,
) -> None:
    classify = load_config({})
    rows = [
        {"text": "stable", "id": 7, "age_band": "80+"},
        {"text": "worse", "label": "not even a label"},
        {"text": "home", "id": ""},
    ]
    records = load_inputs(write_jsonl(tmp_path / "a.jsonl", rows), classify)
    assert [(r.row, r.label, r.extra) for r in records] == [
        (1, None, {"id": 7}),
        (2, None, {}),
        (3, None, {}),
    ]

    chat = load_config({"model.task": "causal-lm"})
    rows = [
        {"prompt": "q?"},
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q?"}]},
    ]
    records = load_inputs(write_jsonl(tmp_path / "b.jsonl", rows), chat)
    assert [r.segments for r in records] == [
        (("q?", False),),
        (
            ("<|assistant|>\n", False),
            ("hi\n", True),
            ("<|user|>\n", False),
            ("q?\n", False),
            ("<|assistant|>\n", False),
        ),
    ]

    rows = [{"text": "a", "id": ["x"]}, {"txt": "b"}, {"text": "Dr. Secret", "id": {"n": 1}}]
    with pytest.raises(DataError) as caught:
        load_inputs(write_jsonl(tmp_path / "c.jsonl", rows), classify)
    message = str(caught.value)
    assert 'c.jsonl:line 1: "id" must be a string, number or boolean, got list' in message
    assert 'c.jsonl:line 2: field "text" missing (records to predict need text)' in message
    assert "Secret" not in message


def test_predict_classifies_every_record_in_order_with_the_adapters_probabilities(
    tiny_bert_dir: Path, bert_adapter: Path, text_file: Path, tmp_path: Path
) -> None:
    records = [{"text": r["text"]} for r in _rows(text_file)[:30]]  # no labels needed
    for i in range(0, 30, 2):
        records[i]["id"] = f"patient-{i}"
    data = write_jsonl(tmp_path / "new-notes.jsonl", records)
    config = _site_config(tmp_path / "site.toml", tiny_bert_dir, 'data.label-names = "no,yes"')
    out = tmp_path / "predictions.jsonl"
    args = ["predict", "--adapter", str(bert_adapter), "--data", str(data), "--out", str(out)]
    assert main([*args, "--config", str(config), "--batch-size", "4"]) == EXIT_OK

    predictions = _rows(out)
    assert [p["line"] for p in predictions] == list(range(1, 31))
    assert [p.get("id") for p in predictions] == [r.get("id") for r in records]
    assert all("text" not in p for p in predictions)
    reference = _reference_classifier(tiny_bert_dir, bert_adapter)
    tokenizer = load_tokenizer(tiny_bert_dir)
    with torch.no_grad():
        for record, prediction in zip(records, predictions, strict=True):
            encoded = tokenizer(
                record["text"], truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
            )
            expected = torch.softmax(reference(**encoded).logits[0], dim=-1).tolist()
            assert prediction["probabilities"] == pytest.approx(expected, abs=1e-5)
            best = max(range(2), key=lambda k: expected[k])
            assert prediction["label"] == ("no", "yes")[best]
            assert prediction["probability"] == pytest.approx(expected[best], abs=1e-5)

    config = _site_config(tmp_path / "plain.toml", tiny_bert_dir)  # no label names: indices
    assert main([*args, "--config", str(config)]) == EXIT_OK
    indices = [("no", "yes").index(p["label"]) for p in predictions]
    assert [p["label"] for p in _rows(out)] == indices


def _reference_completion(model: PeftModel, tokenizer, segments: list[str], tokens: int) -> str:
    """Greedy `generate` on one prompt, its segments tokenised as in training."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for segment in segments:
        ids += tokenizer(segment, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=tokens,
            do_sample=False,
            eos_token_id=tokenizer.sep_token_id,  # what closes completions (no EOS in BERT's)
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, len(ids) :].tolist()
    if tokenizer.sep_token_id in new:
        new = new[: new.index(tokenizer.sep_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_predict_generates_greedily_as_generate_does_and_sampling_repeats_with_a_seed(
    tiny_llama_dir: Path, llama_adapter: Path, instruct_file: Path, tmp_path: Path
) -> None:
    records: list[dict] = [
        {"prompt": r["prompt"] + " " * (i % 3) + "why" * (i % 4), "id": i}
        for i, r in enumerate(_rows(instruct_file)[:8])
    ]
    records.append(
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}]}
    )
    data = write_jsonl(tmp_path / "prompts.jsonl", records)
    config = _site_config(tmp_path / "site.toml", tiny_llama_dir, 'model.task = "causal-lm"')
    base = ["predict", "--adapter", str(llama_adapter), "--data", str(data)]
    base += ["--config", str(config), "--max-new-tokens", "6"]

    def run(name: str, *extra: str) -> list[dict]:
        out = tmp_path / name
        assert main([*base, "--out", str(out), *extra]) == EXIT_OK
        return _rows(out)

    greedy = run("greedy.jsonl", "--batch-size", "3")
    assert [p["line"] for p in greedy] == list(range(1, 10))
    assert [p.get("id") for p in greedy] == [*range(8), None]
    assert run("greedy-again.jsonl", "--batch-size", "1") == greedy  # batching changes nothing
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), llama_adapter
    ).eval()
    tokenizer = load_tokenizer(tiny_llama_dir)
    prompts = [[r["prompt"]] for r in records[:8]]
    prompts.append(["<|system|>\n", "be brief\n", "<|user|>\n", "x\n", "<|assistant|>\n"])
    expected = [_reference_completion(reference, tokenizer, p, 6) for p in prompts]
    assert [p["completion"] for p in greedy] == expected
    assert any(expected)

    sampled = run("sampled.jsonl", "--temperature", "1.0", "--top-p", "0.9", "--seed", "7")
    assert run("sampled-again.jsonl", "--temperature", "1.0", "--top-p", "0.9", "--seed", "7") == (
        sampled
    )
    other = run("other-seed.jsonl", "--temperature", "1.0", "--top-p", "0.9", "--seed", "8")
    assert other != sampled and sampled != greedy


@pytest.fixture
def grouped_notes(text_file: Path, tmp_path: Path) -> Path:
    """The labelled notes with an age band (one band of 8 records), a sex (missing for
    some), and a unit that holds one class only."""
    rows = _rows(text_file)
    for i, row in enumerate(rows):
        row["age_band"] = "80+" if i < 8 else ("18-39" if i % 3 else "40-64")
        if i % 10:
            row["sex"] = "F" if i % 4 < 2 else "M"
        row["unit"] = "cardiology" if row["label"] else "orthopaedics"
    return write_jsonl(tmp_path / "grouped.jsonl", rows)


def test_evaluate_scores_all_records_and_each_subgroup_as_evaluating_it_alone(
    tiny_bert_dir: Path,
    bert_adapter: Path,
    grouped_notes: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _site_config(tmp_path / "site.toml", tiny_bert_dir)
    out = tmp_path / "metrics.json"
    args = ["evaluate", "--adapter", str(bert_adapter), "--data", str(grouped_notes)]
    args += ["--config", str(config), "--group-by", "age_band,sex,unit", "--out", str(out)]
    assert main(args) == EXIT_OK
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())

    cfg = load_config(
        {"model.path": str(tiny_bert_dir), "data.max-length": MAX_LENGTH, "model.precision": "fp32"}
    )
    reference = _reference_classifier(tiny_bert_dir, bert_adapter)
    expected = evaluate(reference, load_eval_file(grouped_notes, cfg), cfg)
    assert summary["records"] == 96
    assert summary["compute"] == {"device": "cpu", "precision": "fp32"}
    assert "computing on cpu, fp32" in printed
    assert set(summary["metrics"]) == set(expected)
    assert all(_same(summary["metrics"][k], v) for k, v in expected.items()), summary["metrics"]
    assert "f1" in printed and f"auroc {expected['auroc']:.4f}" in printed

    rows = _rows(grouped_notes)
    groups = {(g["column"], g["value"]): g for g in summary["groups"]}
    assert set(groups) == {
        ("age_band", "18-39"),
        ("age_band", "40-64"),
        ("age_band", "80+"),
        ("sex", "F"),
        ("sex", "M"),
        ("sex", "(missing)"),
        ("unit", "cardiology"),
        ("unit", "orthopaedics"),
    }
    for (column, value), group in groups.items():
        members = [r for r in rows if r.get(column, "(missing)") == value]
        assert group["records"] == len(members)
        subset = load_eval_file(write_jsonl(tmp_path / "subset.jsonl", members), cfg)
        alone = evaluate(reference, subset, cfg)
        assert all(_same(group["metrics"][k], v) for k, v in alone.items()), (value, group)

    assert groups["age_band", "80+"]["flag"] == "too few records to judge (8 < 20)"
    assert groups["unit", "cardiology"]["flag"] == "a single class present: AUROC undefined"
    assert groups["age_band", "18-39"]["flag"] is None and groups["sex", "F"]["flag"] is None
    lines = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  ")}
    assert "not scored: too few records to judge" in lines["80+"]
    assert "not scored: a single class" in lines["cardiology"]
    f1 = groups["age_band", "18-39"]["metrics"]["f1"]
    assert f"{f1:.4f}" in lines["18-39"] and "not scored" not in lines["18-39"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_records_probabilities_do_not_depend_on_its_batch_mates(
    precision: str, tiny_bert_dir: Path, bert_adapter: Path, text_file: Path
) -> None:
    """Scored with all records, alone, or in other batches: the same numbers, in bf16 too
    (where a batch that needs padding, and so an attention mask, changes every record's
    logits in it by up to ~1e-3)."""
    cfg = load_config(
        {"model.path": str(tiny_bert_dir), "data.max-length": 64, "model.precision": precision}
    )
    model = load_adapted_model(bert_adapter, cfg)
    data = load_eval_file(text_file, cfg)
    assert len(set(data.lengths.tolist())) > 5  # lengths vary: batches would need padding
    together = score(model, data, cfg, batch_size=32).probs
    picked = [i for i in range(len(data)) if i % 3 == 0]
    subset = Tokenized([data.input_ids[i] for i in picked], [0] * len(picked), data.pad_id)
    assert together is not None
    np.testing.assert_allclose(
        score(model, subset, cfg, batch_size=5).probs, together[picked], rtol=0, atol=1e-6
    )
    one_by_one = [
        score(model, Tokenized([data.input_ids[i]], [0], data.pad_id), cfg, batch_size=1).probs
        for i in picked
    ]
    np.testing.assert_allclose(np.concatenate(one_by_one), together[picked], rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_prompts_completion_does_not_depend_on_its_batch_mates(
    precision: str, tiny_llama_dir: Path, llama_adapter: Path, tmp_path: Path
) -> None:
    cfg = load_config(
        {
            "model.path": str(tiny_llama_dir),
            "model.task": "causal-lm",
            "data.max-length": MAX_LENGTH,
            "model.precision": precision,
        }
    )
    rows = [{"prompt": "note " + "stable " * (i % 5) + f"bed {i} risk ?"} for i in range(12)]
    records = load_inputs(write_jsonl(tmp_path / "prompts.jsonl", rows), cfg)
    model = load_adapted_model(llama_adapter, cfg)
    greedy = Sampling(max_new_tokens=8)
    together = predict(model, records, cfg, batch_size=12, sampling=greedy)
    alone = [predict(model, [r], cfg, batch_size=1, sampling=greedy)[0] for r in records]
    assert together == alone
    assert any(c.completion for c in alone)  # type: ignore[union-attr]


def test_no_record_content_reaches_output_or_files(
    tiny_bert_dir: Path,
    bert_adapter: Path,
    grouped_notes: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert plant_canary(grouped_notes, every=2) == 48
    rows = _rows(grouped_notes)
    for i, row in enumerate(rows):
        row["id"] = i
    write_jsonl(grouped_notes, rows)
    config = _site_config(tmp_path / "site.toml", tiny_bert_dir)
    common = ["--adapter", str(bert_adapter), "--data", str(grouped_notes)]
    common += ["--config", str(config)]
    predictions, metrics = tmp_path / "predictions.jsonl", tmp_path / "metrics.json"
    assert main(["predict", *common, "--out", str(predictions)]) == EXIT_OK
    group_by = ["--group-by", "age_band,sex"]
    assert main(["evaluate", *common, *group_by, "--out", str(metrics)]) == EXIT_OK
    assert main(["evaluate", *common, "--group-by", "text"]) == EXIT_INVALID  # values printed
    rows[5]["label"] = f"{CANARY} is no label"
    write_jsonl(grouped_notes, rows)
    assert main(["evaluate", *common]) == EXIT_INVALID
    captured = capsys.readouterr()
    assert "grouped.jsonl:line 6" in captured.err and "a string of" in captured.err
    assert '--group-by "text" is a model input' in captured.err
    for text in (captured.out, captured.err, predictions.read_text(), metrics.read_text()):
        assert CANARY not in text
        assert "worsening" not in text and "resolved" not in text  # nor any other note text


def test_bad_input_gets_one_clear_error_naming_the_file_or_key(
    tiny_bert_dir: Path,
    tiny_llama_dir: Path,
    bert_adapter: Path,
    llama_adapter: Path,
    grouped_notes: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _site_config(tmp_path / "site.toml", tiny_bert_dir)
    data = ["--data", str(grouped_notes), "--config", str(config)]

    def error(*args: str) -> str:
        assert main(list(args)) == EXIT_INVALID
        err = capsys.readouterr().err
        assert err.startswith(f"fedtune-site {args[0]}: ") and "Traceback" not in err, err
        return err

    err = error("evaluate", "--adapter", str(bert_adapter), *data, "--group-by", "age_band,agee")
    assert '--group-by "agee": no record of grouped.jsonl has this field' in err
    assert "age_band" in err  # the fields it does have

    missing = tmp_path / "no-such-adapter"
    out = ["--out", str(tmp_path / "p.jsonl")]
    err = error("predict", "--adapter", str(missing), *data, *out)
    assert f"{missing}: no such adapter directory" in err

    three = {"model.path": str(tiny_bert_dir), "model.num-labels": 3, "lora.rank": 4}
    other_shape = _make_adapter(tmp_path / "three-classes", three)
    err = error("predict", "--adapter", str(other_shape), *data, *out)
    assert f"{other_shape}: adapter tensor " in err and "classifier" in err
    assert "shape (3, 32), the model needs (2, 32)" in err

    state, lora_config = load_adapter(bert_adapter)
    first = sorted(state)[0]
    state[first.replace("lora_A", "lora_X")] = state.pop(first)
    renamed = tmp_path / "renamed"
    save_adapter(state, lora_config, renamed)
    err = error("evaluate", "--adapter", str(renamed), *data)
    assert f"{renamed}: adapter keys do not match the model" in err
    assert first in err and first.replace("lora_A", "lora_X") in err

    err = error("predict", "--adapter", str(llama_adapter), *data, *out)
    assert f"{llama_adapter}: the adapter is for causal-lm" in err
    assert not (tmp_path / "p.jsonl").exists()

    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    llama = _site_config(tmp_path / "llama.toml", tiny_llama_dir, 'model.task = "causal-lm"')
    args = ["--adapter", str(llama_adapter), "--data", str(chat), "--config", str(llama)]
    err = error("predict", *args, *out)
    assert 'chat.jsonl:line 1: "messages" must end with a user message, got assistant' in err
