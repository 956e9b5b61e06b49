"""Local LoRA training throughput: our site loop vs the Hugging Face Trainer + peft recipe.

    python -m simulations.bench_train --out bench-results/train_throughput.json

Both train the same MiniLM with the same LoRA settings, on the same synthetic notes (site-1 of
the README's default federation: `fedtune-sim data --sites 3 --seed 0`), batch size, sequence
length, optimizer, schedule and precision, for the same number of steps (within one epoch).
Each runs in its own process, so that peak memory (max RSS, and CUDA peak on a GPU) is its own.
"Trainer" is the recipe as documented (random batches, dynamic padding); "trainer-grouped"
adds its length-grouped sampler, the closest the recipe gets to our batching.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

IMPLEMENTATIONS = ("ours", "trainer", "trainer-grouped")


def main(argv: list[str] | None = None) -> int:
    """Run every implementation in a child process and write the figures side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/train_throughput.json"))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--model", default="builtin:minilm", help="model.path of the base model")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each implementation, interleaved; medians are reported",
    )
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:  # child process: one implementation, result as JSON on stdout
        print(json.dumps(_measure(args.only, args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        from simulations.synth import write_federation

        summary = write_federation(Path(tmp), num_sites=3, seed=0)
        needed = args.steps * args.batch_size
        if summary.sites[0].train_records < needed:
            parser.error(
                f"--steps x --batch-size = {needed} exceeds site-1's "
                f"{summary.sites[0].train_records} records; use fewer steps"
            )
        data = Path(tmp) / "site-1" / "train.jsonl"
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLEMENTATIONS}
        for repeat in range(args.repeats):  # interleaved, so drifts in machine speed hit all
            for impl in IMPLEMENTATIONS:
                runs[impl].append(_child(impl, data, args, f"{repeat + 1}/{args.repeats}"))
    results = {impl: _median(samples) for impl, samples in runs.items()}
    ours, trainer = results["ours"], results["trainer"]
    report: dict[str, Any] = {
        "benchmark": "local LoRA training throughput",
        "command": "python -m simulations.bench_train " + " ".join(argv or sys.argv[1:]),
        "settings": {
            "model": args.model,
            "lora": "r=8, alpha=16, dropout=0.05, query,value + classifier head",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "precision": args.precision,
            "threads": _threads(),
            "repeats": args.repeats,
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "results": results,
        "runs": runs,
        "ratio_examples_per_s_vs_trainer": ours["examples_per_s"] / trainer["examples_per_s"],
        "ratio_examples_per_s_vs_trainer_grouped": (
            ours["examples_per_s"] / results["trainer-grouped"]["examples_per_s"]
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for impl, r in results.items():
        print(
            f"{impl:>16}: {r['examples_per_s']:7.2f} examples/s  {r['tokens_per_s']:8.0f} "
            f"tokens/s  {r['padding_share']:.0%} padding  peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    print(f"ours / Trainer: {report['ratio_examples_per_s_vs_trainer']:.2f}x  -> {args.out}")
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

    return load_config(
        {
            "model.path": args.model,
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
        TrainerCallback,
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

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            clock["end"] = time.perf_counter()

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


if __name__ == "__main__":
    sys.exit(main())
