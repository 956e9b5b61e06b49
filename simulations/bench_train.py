"""Local LoRA training throughput: our site loop vs the Hugging Face Trainer + peft recipe.

    python -m simulations.bench_train --out bench-results/train_throughput.json
    python -m simulations.bench_train --task causal-lm --out bench-results/train_throughput_sft.json

Both train the same MiniLM with the same LoRA settings, on the same synthetic notes (site-1 of
the README's default federation: `fedtune-sim data --sites 3 --seed 0`), batch size, sequence
length, optimizer, schedule and precision, for the same number of steps (within one epoch).
Each runs in its own process, so that peak memory (max RSS, and CUDA peak on a GPU) is its own.
"Trainer" is the recipe as documented (random batches, dynamic padding); "trainer-grouped"
adds its length-grouped sampler, the closest the recipe gets to our batching.

With `--task causal-lm`, instruction tuning on site-1's prompt/completion records (loss on
the completion only) against TRL's SFTTrainer with a peft LoraConfig, as Flower's LLM
examples use it, with its defaults (no packing). No pre-trained causal model ships offline:
both train the same randomly initialised GPT-2 (6 layers, width 384, MiniLM's tokenizer),
which costs what a pre-trained one of that shape would; LoRA r=8 on c_attn.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

IMPLEMENTATIONS = ("ours", "trainer", "trainer-grouped")
SFT_IMPLEMENTATIONS = ("ours", "sft-trainer")


def main(argv: list[str] | None = None) -> int:
    """Run every implementation in a child process and write the figures side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/train_throughput.json"))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--max-length",
        type=int,
        help="tokens per example; default 128 (classification) or 256 (causal-lm: the longest "
        "instruction record is 170 tokens, so neither side truncates; TRL keeps the start and "
        "drops an example whose completion it cut off)",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--model", default="builtin:minilm", help="model.path of the base model")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each implementation, interleaved; medians are reported",
    )
    parser.add_argument("--task", choices=("classification", "causal-lm"), default="classification")
    parser.add_argument(
        "--only", choices=IMPLEMENTATIONS + SFT_IMPLEMENTATIONS, help=argparse.SUPPRESS
    )
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.max_length = args.max_length or (256 if args.task == "causal-lm" else 128)
    if args.only:  # child process: one implementation, result as JSON on stdout
        print(json.dumps(_measure(args.only, args)))
        return 0
    causal = args.task == "causal-lm"
    implementations = SFT_IMPLEMENTATIONS if causal else IMPLEMENTATIONS
    with tempfile.TemporaryDirectory() as tmp:
        from simulations.synth import write_federation

        summary = write_federation(Path(tmp), num_sites=3, seed=0)
        if causal:
            args.model = str(_random_gpt2(Path(tmp) / "gpt2-6x384"))
        needed = args.steps * args.batch_size
        if summary.sites[0].train_records < needed:
            parser.error(
                f"--steps x --batch-size = {needed} exceeds site-1's "
                f"{summary.sites[0].train_records} records; use fewer steps"
            )
        data = Path(tmp) / "site-1" / ("instruct-train.jsonl" if causal else "train.jsonl")
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in implementations}
        for repeat in range(args.repeats):  # interleaved, so drifts in machine speed hit all
            for impl in implementations:
                runs[impl].append(_child(impl, data, args, f"{repeat + 1}/{args.repeats}"))
    results = {impl: _median(samples) for impl, samples in runs.items()}
    ours = results["ours"]
    if causal:
        ratios = {
            "ratio_examples_per_s_vs_sft_trainer": ours["examples_per_s"]
            / results["sft-trainer"]["examples_per_s"]
        }
    else:
        ratios = {
            "ratio_examples_per_s_vs_trainer": ours["examples_per_s"]
            / results["trainer"]["examples_per_s"],
            "ratio_examples_per_s_vs_trainer_grouped": (
                ours["examples_per_s"] / results["trainer-grouped"]["examples_per_s"]
            ),
        }
    report: dict[str, Any] = {
        "benchmark": "local LoRA training throughput",
        "command": "python -m simulations.bench_train " + " ".join(argv or sys.argv[1:]),
        "settings": {
            "task": args.task,
            "model": "random GPT-2, 6 layers x 384" if causal else args.model,
            "lora": (
                "r=8, alpha=16, dropout=0.05, c_attn"
                if causal
                else "r=8, alpha=16, dropout=0.05, query,value + classifier head"
            ),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "precision": args.precision,
            "threads": _threads(),
            "repeats": args.repeats,
        },
        "machine": _hardware(),
        "results": results,
        "runs": runs,
        **ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for impl, r in results.items():
        print(
            f"{impl:>16}: {r['examples_per_s']:7.2f} examples/s  {r['tokens_per_s']:8.0f} "
            f"tokens/s  {r['padding_share']:.0%} padding  peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    print(f"wrote {args.out}")
    return 0


def _median(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-figure median over repeated runs."""
    import statistics

    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def _child(impl: str, data: Path, args: argparse.Namespace, label: str) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "simulations.bench_train",
        "--only",
        impl,
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--precision",
        args.precision,
        "--model",
        args.model,
        "--task",
        args.task,
    ]
    print(f"running {impl} ({label}) ...", file=sys.stderr)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _threads() -> int:
    return len(os.sched_getaffinity(0))


def _config(args: argparse.Namespace) -> Any:
    from common.config import load_config

    causal = args.task == "causal-lm"
    return load_config(
        {
            "model.path": args.model,
            "model.task": args.task,
            "lora.target-modules": "c_attn" if causal else "query,value",
            "model.precision": args.precision,
            "data.max-length": args.max_length,
            "data.val-fraction": 0.0,
            "data.test-fraction": 0.0,
            "train.batch-size": args.batch_size,
            "train.local-steps": args.steps,
        }
    )


def _measure(impl: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from client.dataset import load_site
    from common.model import set_threads

    cfg = _config(args)
    set_threads(cfg.train.num_threads)
    site = load_site(args.data, cfg)
    if impl == "ours":
        seconds, examples, tokens, padded = _run_ours(site.train, cfg)
    elif impl == "sft-trainer":
        seconds, examples, tokens, padded = _run_sft(args.data, cfg)
    else:
        seconds, examples, tokens, padded = _run_trainer(
            site.train, cfg, group_by_length=impl == "trainer-grouped"
        )
    result = {
        "seconds": seconds,
        "examples": examples,
        "tokens": tokens,
        "examples_per_s": examples / seconds,
        "tokens_per_s": tokens / seconds,
        "padding_share": 1 - tokens / padded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _run_ours(train: Any, cfg: Any) -> tuple[float, int, int, int]:
    from client.train import train_local
    from common.model import build_model

    result = train_local(build_model(cfg), train, cfg)
    return result.seconds, result.examples, result.tokens, result.padded_tokens


def _run_trainer(train: Any, cfg: Any, group_by_length: bool) -> tuple[float, int, int, int]:
    """The standard recipe: AutoModel + get_peft_model + Trainer + DataCollatorWithPadding."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from common.model import load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(
        base,
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.module_list,
        ),
    )
    rows = [
        {"input_ids": ids, "labels": label}
        for ids, label in zip(train.input_ids, train.targets, strict=True)
    ]
    pad = DataCollatorWithPadding(tokenizer)
    seen: list[tuple[int, int, int]] = []  # (examples, tokens, padded) per collated batch

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad(features)
        mask = batch["attention_mask"]
        seen.append((len(features), int(mask.sum()), mask.numel()))
        return batch

    clock: dict[str, float] = {}
    Clock = _clock(clock)

    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=cfg.train.batch_size,
            max_steps=cfg.train.local_steps,
            learning_rate=cfg.train.learning_rate,
            weight_decay=cfg.train.weight_decay,
            warmup_steps=cfg.train.warmup_steps,
            lr_scheduler_type="cosine",
            max_grad_norm=cfg.train.max_grad_norm,
            bf16=cfg.model.precision == "bf16",
            train_sampling_strategy="group_by_length" if group_by_length else "random",
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            seed=cfg.train.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=rows,
            data_collator=collate,
            callbacks=[Clock()],
        )
        trainer.train()
    # The data loader prefetches batches it never trains on: count the consumed ones only.
    consumed = seen[: cfg.train.local_steps]
    examples, tokens, padded = (sum(column) for column in zip(*consumed, strict=True))
    return clock["end"] - clock["start"], examples, tokens, padded


def _clock(clock: dict[str, float]) -> Any:
    """A Trainer callback class that notes when training starts and ends in `clock`."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            clock["end"] = time.perf_counter()

    return Clock


def _random_gpt2(directory: Path) -> Path:
    """A randomly initialised GPT-2 of MiniLM's size, with MiniLM's tokenizer, on disk."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("builtin:minilm"))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=384,
        n_layer=6,
        n_head=6,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _run_sft(data: Path, cfg: Any) -> tuple[float, int, int, int]:
    """TRL's recipe: SFTTrainer on prompt/completion records with a peft LoraConfig."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from common.model import load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(path)
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    )
    clock: dict[str, float] = {}
    Clock = _clock(clock)

    with tempfile.TemporaryDirectory() as out:
        arguments = SFTConfig(
            output_dir=out,
            max_length=cfg.data.max_length,
            per_device_train_batch_size=cfg.train.batch_size,
            max_steps=cfg.train.local_steps,
            learning_rate=cfg.train.learning_rate,
            weight_decay=cfg.train.weight_decay,
            warmup_steps=cfg.train.warmup_steps,
            lr_scheduler_type="cosine",
            max_grad_norm=cfg.train.max_grad_norm,
            bf16=cfg.model.precision == "bf16",
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            seed=cfg.train.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            eos_token=tokenizer.sep_token,
        )
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(path),
            args=arguments,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                r=cfg.lora.rank,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.module_list,
            ),
            callbacks=[Clock()],
        )
        # Counted where the batches enter the model: the trainer also collates batches it
        # never trains on (a probe of one example, prefetching).
        seen: list[tuple[int, int, int]] = []

        def count(_module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
            if torch.is_grad_enabled():
                ids = inputs[0]
                real = int((ids != tokenizer.pad_token_id).sum())
                seen.append((ids.shape[0], real, ids.numel()))

        trainer.model.get_input_embeddings().register_forward_pre_hook(count)
        trainer.train()
    consumed = seen[: cfg.train.local_steps]
    examples, tokens, padded = (sum(column) for column in zip(*consumed, strict=True))
    return clock["end"] - clock["start"], examples, tokens, padded


def _hardware() -> dict[str, Any]:
    """The machine, read in this (parent) process after the measured children are done."""
    from common.precision import hardware

    return hardware()


if __name__ == "__main__":
    sys.exit(main())
