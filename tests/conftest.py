"""Shared fixtures: tiny models built from config objects, and small record files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from common.model import resolve_model_path

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return resolve_model_path("builtin:minilm")


def _save_tiny(out: Path, minilm_dir: Path, build: Callable[[int, int], PreTrainedModel]) -> Path:
    """Save a tiny model from `build(vocab_size, pad_id)` next to the MiniLM tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    torch.manual_seed(0)
    build(tokenizer.vocab_size, tokenizer.pad_token_id).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A 2-layer BERT with hidden size 32 and the MiniLM tokenizer."""
    return _save_tiny(
        tmp_path_factory.mktemp("tiny-bert"),
        minilm_dir,
        lambda vocab, pad: BertModel(
            BertConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=128,
                pad_token_id=pad,
            )
        ),
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A 2-layer Llama with hidden size 32, reusing the MiniLM tokenizer's vocabulary."""
    return _save_tiny(
        tmp_path_factory.mktemp("tiny-llama"),
        minilm_dir,
        lambda vocab, pad: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=64,
                max_position_embeddings=256,
                pad_token_id=pad,
                initializer_range=0.2,  # the default 0.02 leaves a frozen random head near-uniform
            )
        ),
    )


CANARY = "zqxcanarywug"
"""A token no tokenizer vocabulary or generator produces: planted in a site's records, it
must appear nowhere on the coordinator's side."""


def plant_canary(path: Path, every: int = 3) -> int:
    """Append the canary to every `every`-th record's text; returns how many carry it."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows[::every]:
        row["text"] = f"{row['text']} {CANARY}"
    write_jsonl(path, rows)
    return len(rows[::every])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """Classification records whose label is carried by one word."""
    rng = random.Random(0)
    filler = ["patient", "stable", "discharged", "home", "follow", "clinic", "improved", "meds"]
    rows = []
    for i in range(96):
        label = i % 2
        words = rng.choices(filler, k=rng.randint(4, 14))
        words.insert(rng.randint(0, len(words)), "worsening" if label else "resolved")
        rows.append({"text": " ".join(words), "label": label})
    return write_jsonl(tmp_path / "notes.jsonl", rows)


@pytest.fixture
def instruct_file(tmp_path: Path) -> Path:
    """Prompt/completion records with a learnable completion."""
    rows = []
    for i in range(64):
        answer = "yes" if i % 2 else "no"
        prompt = f"note {'heart failure' if i % 2 else 'ankle sprain'} . readmission risk ?"
        rows.append({"prompt": prompt, "completion": answer})
    return write_jsonl(tmp_path / "instruct.jsonl", rows)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Messages read their sender from the task identity, which Flower sets per process."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # type: ignore[attr-defined]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved  # type: ignore[attr-defined]


@pytest.fixture
def sites(text_file: Path, tmp_path: Path) -> dict[int, Path]:
    """Three sites: the shared records split three ways (node ids as Flower would draw them)."""
    rows = [json.loads(line) for line in text_file.read_text().splitlines()]
    return {
        node: write_jsonl(tmp_path / f"site-{i}.jsonl", rows[i::3])
        for i, node in enumerate((9001, 42, 777))
    }
