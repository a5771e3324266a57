"""Typed run configuration (pydantic) and YAML loading with errors that name the key path.

A run config has seven blocks: ``data``, ``model``, ``method``, ``optim``, ``runtime``,
``noise`` and ``distributed``. Every block forbids unknown keys, so a typo is an error that
names the file and the dotted key (``optim.lrr``), never a silently ignored setting.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from calray.errors import ConfigError
from calray.registry import AIB_MODES, CONTRIBUTIONS, DATASETS, FUSIONS, NOISE_KINDS, STRATEGIES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


def check_seeds(v: int | list[int]) -> int | list[int]:
    """A seed spec of a sweep or grid file: a count N ≥ 1 (seeds 0..N-1) or a list of distinct seeds ≥ 0."""
    if isinstance(v, int):
        if v < 1:
            raise ValueError("a seed count must be >= 1")
        return v
    if not v:
        raise ValueError("must list at least one seed")
    if len(set(v)) != len(v):
        raise ValueError(f"duplicate seeds in {v}")
    for i, seed in enumerate(v):
        if seed < 0:
            raise ValueError(f"seed {seed} (item {i}) must be >= 0")
    return v


def seed_list(v: int | list[int]) -> list[int]:
    """The seeds of a seed spec (`check_seeds`)."""
    return list(range(v)) if isinstance(v, int) else list(v)


def plugin_params(registry, name: str, params: dict | None) -> dict:
    """A plug-in's own hyper-parameters (`method.params` for a strategy, `model.fusion_params` for a
    fusion) validated by the `Params` model the plug-in class declares, defaults filled in so the
    resolved config records every value the run used. A plug-in without `Params` takes none."""
    model = getattr(registry.get(name), "Params", None)
    if model is None:
        if params:
            raise ValueError(f"{registry.kind} {name!r} takes no parameters, got {', '.join(sorted(params))}")
        return {}
    try:
        return model.model_validate(params or {}).model_dump(mode="json")
    except ValidationError as e:
        first = e.errors()[0]
        key = _format_loc(tuple(first["loc"]))
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ValueError(f"{key}: {msg} ({registry.kind} {name!r})") from None


class DataConfig(Strict):
    dataset: str = "synthetic"
    root: str | None = None
    modalities: list[str] | None = None  # None: every modality the dataset has
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = 0  # data seed: synthetic generation and the derived validation split
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    cache_dir: str | None = None  # decoded frames/spectrograms cached here (memory-mapped)
    params: dict[str, Any] = Field(default_factory=dict)  # dataset-specific, validated by the dataset


class EncoderConfig(Strict):
    name: str = "mlp"  # resnet18/34/50/101/152, mlp, bert
    in_channels: int | None = None  # resnets: 3 for images, 1 for spectrograms/depth
    frames: bool = False  # input B×T×C×H×W: frames folded into the batch, pooled over time
    hidden: list[int] = Field(default_factory=lambda: [128])  # mlp hidden sizes
    out_dim: int | None = None  # embedding size; resnets: native (512/2048), mlp: last hidden
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    weights: str | None = None  # local state_dict file loaded into the encoder
    pretrained_path: str | None = None  # bert: a local transformers directory (never a hub id)
    bert_config: dict[str, Any] | None = None  # bert: BertConfig kwargs for a random init


class ModelConfig(Strict):
    encoders: dict[str, EncoderConfig] = Field(default_factory=dict)  # per modality
    fusion: str = "concat"  # a name in calray.registry.FUSIONS
    fusion_dim: int | None = None  # projection size for sum/film/gated (default: min embedding size)
    unimodal_head: Literal["shared", "separate"] = "shared"
    fusion_params: dict[str, Any] = Field(default_factory=dict, validate_default=True)  # the fusion's own Params (docs/METHOD.md)

    @field_validator("fusion")
    @classmethod
    def _registered_fusion(cls, v):
        return FUSIONS.check(v)

    @field_validator("fusion_params")
    @classmethod
    def _fusion_params(cls, v, info: ValidationInfo):
        return plugin_params(FUSIONS, info.data["fusion"], v) if "fusion" in info.data else v


class MethodConfig(Strict):
    """CAL and its ablations/baselines as switches of one loop (paper section III, Fig. 2, Tables IV–V).

    T, eta, lambda and n are the sweep's search axes.
    """

    strategy: str = "cal"  # a name in calray.registry.STRATEGIES (ogm_ge: fused CE only)
    T: float = 1.0  # eq 12: a = softmax(T·W); T multiplies W (an inverse temperature)
    eta: float = Field(1.0, ge=0.0)  # eq 14: g_m ← (1 + η·a_m)·g_m
    lambda_: float = Field(1.0, alias="lambda", ge=0.0)  # eq 21: weight of L_AIB
    n: int = Field(5, ge=1)  # eq 9: window of R^m(t, n) in epochs
    contribution: str = "d_x_i"  # Table V, calray.registry.CONTRIBUTIONS
    contribution_space: Literal["logits", "embeddings"] = "logits"  # the pair I(m) is measured on
    phi_ablation: Literal["zero", "mean"] = "zero"  # eq 8: how modality m is removed
    mi_shrinkage: float = Field(1e-3, ge=0.0)  # eq 5: Σ ← (1−s)Σ + s·tr(Σ)/d·I
    aib: str = "beta"  # Table IV, calray.registry.AIB_MODES
    # where β_m acts: on I(Z;X) as eq 19 (default: weak modalities compressed more, as the prose
    # says) or on I(Z;Y) as eq 20 is printed (the dominant one compressed hardest); docs/METHOD.md
    aib_placement: Literal["eq19", "eq20"] = "eq19"
    beta_T: float | None = Field(None, ge=0.0)  # β = 1 − softmax(beta_T·W) (eq 17); None: the modulation's T
    latent_dim: int | None = None  # AIB latent size (default: the embedding size)
    unimodal_weight: float = Field(1.0, ge=0.0)  # eq 21: weight of Σ_m CE(p^m, y)
    warmup_epochs: int = Field(0, ge=0)  # epochs trained with no modulation
    track_contributions: bool = True  # accumulate/log W, a, β even when the strategy ignores them
    update_every: int | None = Field(None, ge=1)  # refresh W every k steps (default: each epoch)
    ogm_alpha: float = Field(0.8, ge=0.0)  # OGM-GE: k = 1 − tanh(α·ρ) for the dominant modality (ρ > 1)
    ogm_continuous: bool = False  # k = 1 − tanh(α·relu(ρ − 1)) instead: no jump at ρ = 1
    ogm_epochs: tuple[int, int] = (0, 50)  # OGM-GE modulation window [start, end]
    ogm_ge_noise: bool = True  # OGM-GE (GE): add N(0, std(grad)²) to every modality's weight gradients
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True)  # the strategy's own Params (baselines; docs/METHOD.md)

    @field_validator("strategy", mode="before")
    @classmethod
    def _yaml_null_strategy(cls, v):
        """YAML reads a bare `strategy: null` (or `--set method.strategy=null`) as None; the
        strategy named "null" (uniform a) is what is meant."""
        return "null" if v is None else v

    @field_validator("aib", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    @field_validator("strategy")
    @classmethod
    def _registered_strategy(cls, v):
        return STRATEGIES.check(v)

    @field_validator("params")
    @classmethod
    def _strategy_params(cls, v, info: ValidationInfo):
        return plugin_params(STRATEGIES, info.data["strategy"], v) if "strategy" in info.data else v

    @field_validator("contribution")
    @classmethod
    def _registered_contribution(cls, v):
        return CONTRIBUTIONS.check(v)

    @field_validator("aib")
    @classmethod
    def _registered_aib(cls, v):
        return AIB_MODES.check(v)

    @model_validator(mode="after")
    def _tracking_needed(self):
        if not self.track_contributions and (self.strategy in ("cal", "weak") or self.aib not in ("off",)):
            raise ValueError(f"track_contributions=false, but strategy {self.strategy!r} / aib {self.aib!r} "
                             "need the contributions (use strategy none|null|ogm_ge|ogm_ge_mix with aib off)")
        return self

    @model_validator(mode="after")
    def _ogm_ge_as_published(self):
        """`ogm_ge` is the published baseline (Peng et al., CVPR 2022), which trains on the fused
        cross-entropy only; the loss keys stay explicit, so they must say so."""
        if self.strategy == "ogm_ge" and (self.aib != "off" or self.unimodal_weight != 0):
            raise ValueError(
                f"strategy 'ogm_ge' is OGM-GE as published (fused cross-entropy only), but method.aib is "
                f"{self.aib!r} and method.unimodal_weight is {self.unimodal_weight:g}: set method.aib: off "
                "and method.unimodal_weight: 0, or use strategy 'ogm_ge_mix' (OGM-GE's modulation inside "
                "the configured CAL loss: unimodal CE terms and AIB)")
        return self


class ModalityOptimConfig(Strict):
    """One modality's optimiser group (`optim.per_modality.<m>`); unset keys follow the default group."""

    name: Literal["sgd", "adam", "adamw"] | None = None
    lr: float | None = Field(None, gt=0.0)
    weight_decay: float | None = Field(None, ge=0.0)
    momentum: float | None = Field(None, ge=0.0)
    betas: tuple[float, float] | None = None


class OptimConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = Field(10, ge=1)
    # per epoch: step, multistep, cosine, plateau (on val accuracy); per optimizer update:
    # linear_warmup (lr·u/(w·U) for the first w·U of U updates, then linearly to 0 at U)
    scheduler: Literal["none", "step", "multistep", "cosine", "plateau", "linear_warmup"] = "none"
    step_size: int = Field(70, ge=1)
    milestones: list[int] = Field(default_factory=lambda: [70])
    gamma: float = Field(0.1, gt=0.0)
    plateau_patience: int = Field(10, ge=0)
    warmup_proportion: float = Field(0.1, ge=0.0, lt=1.0)  # linear_warmup: w, the warm-up share of all updates
    grad_clip: float | None = Field(None, gt=0.0)
    grad_accum: int = Field(1, ge=1)  # optimizer step every k batches (QMF: batch 16 × 40 for MVSA)
    early_stop_patience: int | None = Field(None, ge=1)  # epochs without val improvement
    # modality → its own optimiser settings for its encoder (+ AIB head); shared parameters and
    # unlisted modalities use the settings above (calray/optim.py)
    per_modality: dict[str, ModalityOptimConfig] = Field(default_factory=dict)


class RuntimeConfig(Strict):
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast (CUDA only)
    channels_last: bool = True  # CUDA only
    seed: int = 0  # training seed: init, shuffling, reparameterisation
    output_dir: str = "runs"
    run_name: str | None = None  # default: the config's name
    progress: bool = True
    tensorboard: bool = True  # TensorBoard events in <run dir>/tensorboard (calray.engine.tensorboard)
    checkpoint_every: int = Field(1, ge=1)
    resume: bool = True  # continue from run_dir/checkpoints/last.pt when present
    max_steps_per_epoch: int | None = Field(None, ge=1)  # for smoke tests and benchmarks


class NoiseConfig(Strict):
    """Noise attacks (calray.data.noise) with the anchors' ε semantics; see docs/DATASETS.md."""

    kind: str = "none"  # calray.registry.NOISE_KINDS
    eps: float = Field(0.0, ge=0.0)
    mode: Literal["test", "train+test"] = "test"
    seed: int = 0  # noise seed, separate from the training seed (QMF protocol)
    modalities: list[str] | None = None  # attacked modalities (default: dataset's choice)
    p_apply: float | None = Field(None, ge=0.0, le=1.0)  # per-sample attack probability override
    density: float = Field(0.1, ge=0.0, le=1.0)  # salt-pepper pixel fraction
    std_scale: float | None = Field(None, gt=0.0)  # ε → std on 0–255 (default: 1 NYUD2, 10 MVSA)
    text: bool = True  # MVSA: also attack the text (QMF does for both kinds)
    legacy: bool = False  # QMF before 2025-06-28: salt-pepper p_apply = 0.5·ε/10
    qmf_compat: bool = False  # reproduce QMF's quirks (uint8 wrap, one fixed noise field)
    audio_scale: float = Field(0.1, gt=0.0)  # A/V spectrogram: Gaussian std = ε·audio_scale·std(spectrogram)

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, v):
        return NOISE_KINDS.check(v)

    @model_validator(mode="after")
    def _eps_needs_kind(self):
        if self.kind == "none" and self.eps != 0.0:
            raise ValueError("eps > 0 needs kind 'gaussian' or 'salt_pepper'")
        return self


class DistributedConfig(Strict):
    workers: int = Field(1, ge=1)
    gpu: bool = False
    address: str | None = None  # None: local Ray; "auto" or host:port of a running cluster
    cpus_per_worker: float = Field(1.0, gt=0.0)
    sync_bn: bool = False
    check_consistency: bool = False  # all-gather a checksum of `a` at each refresh; fail on mismatch
    max_failures: int = Field(0, ge=-1)
    storage_path: str | None = None  # shared storage for multi-node runs (default: runtime.output_dir)
    find_unused_parameters: bool | None = None  # DDP; None: detect (probe forward/backward before wrapping)
    collective_timeout_s: float = Field(1800.0, gt=0.0)  # torch.distributed timeout: a hung collective fails


class RunConfig(Strict):
    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\0"):
            raise ValueError("name must be non-empty and contain no path separators")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def run_dir(self) -> Path:
        return Path(self.runtime.output_dir) / (self.runtime.run_name or self.name)


# ---------------------------------------------------------------- loading and overrides


def _format_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after",)) or "<root>"


def validation_error_message(err: ValidationError, source: str, prefix: str = "") -> str:
    """One line naming the source and the dotted key path of the first problem."""
    errors = err.errors()
    first = errors[0]
    key = _format_loc(tuple(first["loc"]))
    if prefix:
        key = f"{prefix}.{key}" if key != "<root>" else prefix
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=0.01` → (["optim", "lr"], 0.01); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config tree as dotted keys: {"a": {"b": 1}} → {"a.b": 1}; lists, scalars and {} are leaves."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def get_dotted(tree: Any, dotted: str) -> Any:
    """The value at a dotted key of a config tree; None when any part is absent."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a mapping")
        node = child
    node[path[-1]] = value


def apply_overrides(tree: dict, overrides: dict[str, Any] | list[str] | None) -> dict:
    """Return a copy of `tree` with dotted overrides applied (strings `k=v` or a mapping)."""
    tree = copy.deepcopy(tree)
    if not overrides:
        return tree
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        path = key.split(".") if isinstance(key, str) else key
        set_dotted(tree, path, value)
    return tree


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    return tree


def config_from_dict(tree: dict, source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(validation_error_message(e, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Read a run config from YAML and apply dotted overrides (`["optim.lr=0.01"]` or a dict).

    Any problem raises one `ConfigError` naming the file and the dotted key path.
    """
    tree = apply_overrides(read_yaml(path), overrides)
    return config_from_dict(tree, str(path))


PATH_KEYS = (("data", "root"), ("data", "cache_dir"), ("runtime", "output_dir"), ("distributed", "storage_path"))
ENCODER_PATH_KEYS = ("weights", "pretrained_path")


def absolute_paths(tree: dict, base: str | Path | None = None) -> dict:
    """A copy of a run-config dict with every relative filesystem path made absolute against `base`
    (default: the working directory) — for runs that execute elsewhere (Ray workers and trials) and
    for comparing a stored config with a new one. Covers data.root/cache_dir, runtime.output_dir,
    distributed.storage_path, each encoder's weights/pretrained_path, and the `data.params` keys the
    dataset declares as paths (`register_dataset(..., path_params=...)`). Missing blocks are fine."""
    tree = copy.deepcopy(tree)
    base = Path(base) if base is not None else Path.cwd()

    def fix(node, key: str) -> None:
        v = node.get(key) if isinstance(node, dict) else None
        if isinstance(v, str) and v and "://" not in v:
            node[key] = str((base / Path(v).expanduser()).resolve())

    for block, key in PATH_KEYS:
        fix(tree.get(block), key)
    for enc in ((tree.get("model") or {}).get("encoders") or {}).values():
        for key in ENCODER_PATH_KEYS:
            fix(enc, key)
    data = tree.get("data") or {}
    dataset = data.get("dataset", "synthetic")
    if isinstance(data.get("params"), dict) and dataset in DATASETS:
        for key in getattr(DATASETS.get(dataset), "path_params", ()):
            fix(data["params"], key)
    return tree


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
