"""Typed run configuration, validated once where it enters (the jobs); the engine gets plain values.

Defaults are the PatchCore reference settings (WRN50 layer2+layer3, 256 -> 224, 1024 dims, 10 %
coreset, k = 1). Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from anomaly_core.augment import Augmentation
from anomaly_core.metrics import METRIC_NAMES
from anomaly_core.registry import IMAGE_SIZE, MODELS


class ConfigError(ValueError):
    """The configuration is invalid; the message names every offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    format: Literal["mvtec", "mvtec3d", "mvtec_loco", "autovi", "visa", "btad", "folder", "synthetic"]
    root: str
    categories: list[str] | None = None  # None = every category found under root
    # folder format only: read its masks as anomalous where > this grey value (0..255) instead of refusing grey
    # masks; every other format reads its masks as its authors define them (anomaly_core.data.images.read_mask)
    mask_threshold: int | None = Field(None, ge=0, le=255, strict=True)

    @field_validator("mask_threshold")
    @classmethod
    def _folder_only(cls, value: int | None, info: ValidationInfo) -> int | None:
        fmt = info.data.get("format")  # absent when invalid, and then reported on its own
        if value is not None and fmt not in (None, "folder"):
            raise ValueError(f"only the folder format takes a mask_threshold; {fmt} masks are read as the "
                             f"dataset's authors define them")
        return value


class BackboneConfig(_Strict):
    name: str = "wide_resnet50_2"
    layers: list[str] = Field(default_factory=lambda: ["layer2", "layer3"])
    weights: str = "random"  # a .pth/.safetensors path, "package" (installed weights) or "random"


class PreprocessConfig(_Strict):
    resize: int = Field(256, ge=8)
    crop: int = Field(224, ge=8)
    # JPEGs decoded (nvJPEG) and every image resized on the GPU: other pixels, so other features; recorded in
    # the bank, which is then only used with it (anomaly_core/data/device_decode.py). Needs GPU extractors.
    gpu_jpeg_decode: bool = False

    @model_validator(mode="after")
    def _crop_fits(self) -> "PreprocessConfig":
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        return self


class EmbeddingConfig(_Strict):
    patch_size: int = Field(3, ge=1)
    patch_stride: int = Field(1, ge=1)  # patchcore-inspection's --patchstride: > 1 coarsens the patch grid
    pretrain_dim: int = Field(1024, ge=1)
    target_dim: int = Field(1024, ge=1)


class CoresetConfig(_Strict):
    method: Literal["exact", "approximate", "none"] = "approximate"
    ratio: float = Field(0.1, gt=0.0, le=1.0)
    projection_dim: int = Field(128, ge=1)
    distributed: Literal["sharded", "two_round"] = "sharded"


class ScoringConfig(_Strict):
    k: int = Field(1, ge=1)
    reweight_neighbours: int = Field(0, ge=0)
    blur_sigma: float = Field(4.0, ge=0.0)
    distance: Literal["euclidean", "cosine"] = "euclidean"
    image_score: Literal["max", "mean_top_percent"] = "max"
    top_percent: float = Field(1.0, gt=0.0, le=100.0)  # with image_score=mean_top_percent

    @model_validator(mode="after")
    def _reweight_needs_max(self) -> "ScoringConfig":
        if self.reweight_neighbours and self.image_score != "max":
            raise ValueError("reweight_neighbours re-weights the max patch score: it needs image_score=max")
        return self


class PadimConfig(_Strict):
    """PaDiM's settings (anomaly_core/padim.py), read where ``method: padim``. Defaults: the authors' code
    (xiahaifeng1995): 100 channels (ResNet18's; 550 for WRN50), the subset drawn after random.seed(1024),
    covariance + 0.01 I, maps blurred with sigma 4."""

    channels: int = Field(100, ge=1, strict=True)  # kept of the chosen layers' channels
    seed: int = Field(1024, strict=True)  # of the channel subset (recorded with its indices)
    epsilon: float = Field(0.01, gt=0.0, allow_inf_nan=False)  # added to each covariance's diagonal
    blur_sigma: float = Field(4.0, ge=0.0, allow_inf_nan=False)


class ThresholdConfig(_Strict):
    # Where bank.json's deployment thresholds come from: F1-optimal on the labelled test set (optimistic),
    # or a quantile of the scores of good training images held out of the bank (anomaly_core/thresholds.py).
    source: Literal["test_f1", "validation"] = "test_f1"
    validation_split: float = Field(0.1, gt=0.0, lt=1.0)  # fraction of the good training images held out
    quantile: float = Field(0.99, gt=0.0, le=1.0)


class MetricsConfig(_Strict):
    pro_fpr_limit: float = Field(0.3, gt=0.0, le=1.0)


class ClusterConfig(_Strict):
    num_extractors: int | Literal["auto"] = "auto"  # auto = one per GPU, else one per 2 CPUs
    num_evaluators: int | Literal["auto"] = "auto"
    gpus_per_extractor: float = Field(0.0, ge=0.0)  # 1, or a fraction to pack several per GPU
    cpus_per_actor: float = Field(1.0, gt=0.0)
    batch_size: int = Field(8, ge=1)
    fp16: bool = False
    coreset_shards: int = Field(2, ge=1)
    coreset_batch: int = Field(128, ge=1)  # candidates per shard per round trip
    # BLAS/torch threads of a coreset holder / an evaluator; auto = see cluster/resources.py (README "Resources").
    coreset_threads: int | Literal["auto"] = "auto"
    eval_threads: int | Literal["auto"] = "auto"
    # Threads decoding images per extractor; auto = see cluster/resources.py (README "Resources").
    decode_workers: int | Literal["auto"] = "auto"
    # Times a lost actor is restarted; jobs.train: times a fit/predict task whose process or node died is
    # run again, and a DDP category's Ray Train worker group restarted (both continue from checkpoints/latest).
    max_restarts: int = Field(3, ge=0)
    # Categories whose extraction may run ahead of the coreset: enough to keep the extractors busy,
    # few enough that a full benchmark's features never pile up in the object store.
    prefetch_categories: int = Field(2, ge=1)
    # Seconds without a finished stage after which the run logs what it waits for (0 = never).
    stall_warning_s: float = Field(600.0, ge=0.0)
    # A run that joined a cluster asks its autoscaler for the extractors' nodes and waits this long for them
    # (cluster/scaling.py); an embedded local Ray never waits.
    resource_wait_s: float = Field(600.0, ge=0.0)
    # Extractors that are also their features' coreset holders and kNN scorers, so features stay in the process
    # (on the GPU) that made them (cluster/colocated.py); auto = where extractors have a GPU share.
    colocate: bool | Literal["auto"] = "auto"

    @field_validator("num_extractors", "num_evaluators", "coreset_threads", "eval_threads", "decode_workers")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return value


class WandbConfig(_Strict):
    mode: Literal["auto", "online", "offline", "off"] = "auto"  # auto = online if logged in, else offline
    project: str = "anomaly-bench"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    log_images: int = Field(3, ge=0)  # best and worst test images per category to log
    log_run_folder: bool = True  # summary, report, CSVs, figures and per-category JSON as one artifact

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        """YAML 1.1 reads a bare ``off`` as false; it still means mode 'off'."""
        return "off" if value is False else value


class AugmentConfig(_Strict):
    """Augmented copies of the good training images in the bank (anomaly_core/augment.py; off by default)."""

    copies: int = Field(0, ge=0)  # per training image, beside the original
    rotation_degrees: float = 0.0  # uniform in ±degrees
    brightness: float = 0.0  # factor uniform in [1 - x, 1 + x]
    contrast: float = 0.0
    blur_sigma: float = 0.0  # Gaussian sigma uniform in [0.1, blur_sigma]; 0 = off
    hflip: bool = False  # with probability 0.5

    @model_validator(mode="after")
    def _valid(self) -> "AugmentConfig":
        Augmentation(**self.model_dump())  # its rules, checked where the config enters
        return self


class AnomalyDinoConfig(_Strict):
    """AnomalyDINO's preprocessing (anomaly_core/data/anomalydino.py): the PCA background mask on the test images'
    patches and the eight reference rotations of the training images, per category. ``auto`` takes the value of
    the authors' per-category table under ``preset`` (MVTec AD and VisA categories only). The mask is computed on
    the patch features the scorer gets: the raw tokens where the embedding keeps them as they are (patch_size 1,
    pretrain_dim = target_dim = the token width, as configs/anomalydino.yaml)."""

    preset: str = "agnostic"  # the authors' default
    masking: bool | Literal["auto"] = "auto"
    rotation: bool | Literal["auto"] = "auto"
    # On the first principal component of an image's patches: the authors' 10 is for DINOv2 tokens; another
    # backbone's tokens (or random weights) have another scale.
    threshold: float = Field(10.0, allow_inf_nan=False)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in _anomalydino().PRESETS:
            raise ValueError(f"must be one of {', '.join(_anomalydino().PRESETS)}, got {value!r}")
        return value


def _anomalydino() -> Any:
    """The table's module, imported where a config has the section: anomaly_core.data pulls in the image stack
    (torchvision), which a config alone does not need."""
    from anomaly_core.data import anomalydino

    return anomalydino


class FeatureCacheConfig(_Strict):
    # Extracted features kept per (dataset, category, split, model, image size, weights, image list,
    # augmentation): a run that changes only coreset or scoring knobs skips extraction.
    enabled: bool = False
    dir: str = "~/.cache/anomaly-bench/features"  # on the driver's node, like output_dir


class TrainingConfig(_Strict):
    """A model trained per category (anomaly_core/training), read by jobs.train only: the teacher is ``backbone``,
    the image size ``preprocess``; PatchCore's sections (embedding, coreset, scoring, augment) do not apply.

    ``model`` names an entry of anomaly_core.registry.MODELS. Every recipe key left unset (null) takes the value
    of ``recipe`` (that entry's recipes), and so does an unset
    ``preprocess.resize`` / ``crop``; the validated config holds every resolved value, and ``recipe_record``
    says which of them differ from the recipe's.
    """

    model: str  # a name in anomaly_core.registry.MODELS
    recipe: str | None = None  # None: the entry's default (the authors' code); else one of its recipes (README)
    epochs: int | None = Field(None, ge=1)
    # The Trainer's max_steps: training ends after this many optimisation steps, within an epoch if need be; a
    # recipe counted in steps names it (efficient_ad: 70000, dinomaly: 5000) and sets epochs as a bound that never binds.
    max_steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)  # global
    drop_last: bool | None = None
    lr: float | None = Field(None, gt=0.0)
    weight_decay: float | None = Field(None, ge=0.0)
    clip_grad_norm: float | None = Field(None, ge=0.0)  # the gradients' largest norm; 0 = no clipping
    # reverse_distillation: Adam's betas; a linear warm-up, then x decay_factor from decay_at of the epochs on.
    betas: tuple[float, float] | None = None
    warmup_epochs: int | None = Field(None, ge=0)
    decay_at: float | None = Field(None, gt=0.0, le=1.0)
    decay_factor: float | None = Field(None, gt=0.0, le=1.0)  # 1 = a constant rate
    align_corners: bool | None = None  # of the anomaly maps' bilinear upsampling
    # stfpm: SGD's momentum; the loss over a batch (mean: the authors', half_sum: anomalib's 0.5 x sum over images);
    # timm's zero-initialised last BatchNorm of each residual block (torchvision's resnet18 has none); a fraction of
    # train/good held out (split by the run seed) for the monitor held_out_loss.
    momentum: float | None = Field(None, ge=0.0)
    loss: Literal["mean", "half_sum"] | None = None
    zero_init_last: bool | None = None
    held_out_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    # fastflow: AllInOneBlock coupling steps per layer's flow; the subnets' hidden channels per input channel; 3x3
    # subnet convolutions on every step (false: 1x1 on odd steps).
    flow_steps: int | None = Field(None, ge=1)
    hidden_ratio: float | None = Field(None, gt=0.0)
    conv3x3_only: bool | None = None
    # dinomaly: StableAdamW (AMSGrad) with lr, betas, weight_decay above and its eps; the rate warms up over
    # warmup_steps, then falls along a cosine to final_lr at max_steps optimisation steps, where training ends (within
    # training.epochs); biases in its MLPs (the authors') or none (anomalib); the score map's blur padded with zeros
    # (the authors') or reflected (anomalib); the anomaly map blurred (the authors') or raw (anomalib).
    final_lr: float | None = Field(None, gt=0.0)
    warmup_steps: int | None = Field(None, ge=0)
    eps: float | None = Field(None, gt=0.0)
    mlp_bias: bool | None = None
    blur_padding: Literal["zeros", "reflect"] | None = None
    blurred_map: bool | None = None
    # efficient_ad (the teacher PDN, i.e. the size, is backbone.name pdn_small|pdn_medium; it reuses lr, weight_decay,
    # decay_at, decay_factor and held_out_fraction): where the maps are quantile-normalised, at the PDN's resolution
    # (grid: nelson1425) or padded and upsampled to the image (image: anomalib).
    map_normalisation: Literal["grid", "image"] | None = None
    # draem: lr x decay_factor at each of milestones (fractions of the epochs); simulated anomalies (synthesis: the
    # authors' augmenters or anomalib's generator) with anomaly_probability, texture opacity in [low, high), the
    # normal image itself rotated with probability image_rotation; the loss's form, the discriminator's input
    # order, the score's average-pooling size (1: the map's max), the authors' N(0, 0.02) initialisation; the
    # reconstructive network's base width (the discriminative network's is half).
    base_width: int | None = Field(None, ge=2)
    milestones: tuple[float, ...] | None = None
    synthesis: Literal["draem", "anomalib"] | None = None
    anomaly_probability: float | None = Field(None, ge=0.0, le=1.0)
    opacity: tuple[float, float] | None = None
    image_rotation: float | None = Field(None, ge=0.0, le=1.0)
    loss_form: Literal["draem", "anomalib"] | None = None
    discriminator_input: Literal["reconstruction_first", "image_first"] | None = None
    score_pool: int | None = Field(None, ge=1)
    init_normal: bool | None = None
    # Which epoch's weights are exported: "last", or "best" (the monitor's best; the default with patience). The
    # monitor: "loss" (the epoch's mean training loss), "held_out_loss" (mean anomaly map of the held-out images)
    # or a metric on the test set (e.g. image_auroc; validation on the test set as anomalib's default, an
    # optimistic choice); mode follows from it (min for losses, max for metrics).
    weights: Literal["last", "best"] | None = None
    monitor: str | None = None
    mode: Literal["min", "max"] | None = None
    patience: int | None = Field(None, ge=1)  # checks without improvement before stopping; None: never stop
    min_delta: float = Field(0.0, ge=0.0)
    validate_every_n_epochs: int = Field(10, ge=1)  # metrics on the test set, logged; 0 validations = cheaper
    log_every_n_steps: int = Field(10, ge=1)
    # Ray: each category is one task on gpus_per_worker (a share packs several on a GPU); a category in
    # ddp_categories trains on ddp_workers Ray Train workers (TorchTrainer, DDP; CPU workers without GPUs).
    gpus_per_worker: float = Field(0.0, ge=0.0)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    ddp_workers: int = Field(2, ge=1)
    ddp_categories: list[str] = Field(default_factory=list)  # "category" or "dataset/category"
    # Auxiliary image folders by name (the registry entry's auxiliary: dtd, imagenette), filled from
    # configs/paths.yaml's datasets mapping; each folder is checked to exist before any work starts.
    auxiliary: dict[str, str] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model_known(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; known: {', '.join(MODELS)}")
        return value

    @field_validator("recipe")
    @classmethod
    def _recipe_known(cls, value: str | None, info: ValidationInfo) -> str | None:
        model = info.data.get("model")
        if value is not None and model is not None and value not in MODELS[model].recipes:
            default = MODELS[model].default_recipe
            others = [name for name in MODELS[model].recipes if name != default]
            raise ValueError(f"unknown recipe {value!r} for {model}; choose {default} (the authors' code, the "
                             f"default) or {', '.join(others)}")
        return value

    @field_validator("monitor")
    @classmethod
    def _monitor_known(cls, value: str | None) -> str | None:
        if value is not None and value not in ("loss", "held_out_loss", *METRIC_NAMES):
            raise ValueError(f"must be loss, held_out_loss or one of {', '.join(METRIC_NAMES)}, got {value!r}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"Adam's betas must lie in [0, 1), got {list(value)}")
        return value

    @field_validator("milestones")
    @classmethod
    def _milestones_in_range(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and not all(0.0 < m <= 1.0 for m in value):
            raise ValueError(f"milestones are fractions of the epochs in (0, 1], got {list(value)}")
        return value

    @field_validator("opacity")
    @classmethod
    def _opacity_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0.0 <= value[0] <= value[1] <= 1.0:
            raise ValueError(f"must be [low, high] with 0 <= low <= high <= 1, got {list(value)}")
        return value

    @field_validator("score_pool")
    @classmethod
    def _odd_pool(cls, value: int | None) -> int | None:
        if value is not None and value % 2 == 0:
            raise ValueError(f"must be odd (a window centred on each pixel), got {value}")
        return value

    @model_validator(mode="after")
    def _resolve_recipe(self) -> "TrainingConfig":
        """Fill every unset recipe key from the recipe; refuse keys of the other model and contradictions."""
        entry = MODELS[self.model]
        recipe_name = self.recipe or entry.default_recipe
        foreign = [(key, other) for other, other_entry in MODELS.items() if other != self.model
                   for key in other_entry.recipe_keys
                   if key not in entry.recipe_keys and getattr(self, key) is not None]
        if foreign:
            key, other = foreign[0]
            raise ValueError(f"training.{key} applies to {other}, not {self.model}")
        missing = [name for name in entry.auxiliary if not self.auxiliary.get(name)]
        if missing:
            raise ValueError(f"training.auxiliary.{missing[0]}: {self.model} trains with the {missing[0]} image "
                             f"folder; set datasets.{missing[0]} in configs/paths.yaml (or --set "
                             f"training.auxiliary.{missing[0]}=DIR)")
        unused = sorted(set(self.auxiliary) - set(entry.auxiliary))
        if unused:
            raise ValueError(f"training.auxiliary.{unused[0]}: {self.model} uses no {unused[0]} folder"
                             + (f" (it uses {', '.join(entry.auxiliary)})" if entry.auxiliary else ""))
        recipe = entry.recipes[recipe_name].values
        filled: dict[str, Any] = {"recipe": recipe_name}
        for key in entry.recipe_keys:
            if getattr(self, key) is None:
                filled[key] = recipe[key]
        if self.weights is None and self.patience is not None:
            filled["weights"] = "best"  # early stopping exports the epoch it judged best
        monitor = filled.get("monitor", self.monitor)
        expected = "min" if monitor in ("loss", "held_out_loss") else "max"  # every metric is better when higher
        if self.mode not in (None, expected):
            raise ValueError(f"monitor {monitor} is only judged with mode {expected}, got mode {self.mode}")
        filled["mode"] = expected
        if monitor == "held_out_loss" and not filled.get("held_out_fraction", self.held_out_fraction):
            raise ValueError("training.monitor held_out_loss needs training.held_out_fraction > 0 (stfpm)")
        return self.model_copy(update=filled)

    def recipe_record(self, preprocess: PreprocessConfig) -> dict[str, Any]:
        """What model.json records: the recipe, its source, every resolved value, and those that differ from it."""
        recipe = MODELS[self.model].recipes[self.recipe]
        values = {key: getattr(preprocess if key in IMAGE_SIZE else self, key) for key in recipe.values}
        changed = {key: {"config": value, "recipe": recipe.values[key]} for key, value in values.items()
                   if value != recipe.values[key]}
        return {"name": self.recipe, "source": recipe.source, "values": values, "changed": changed}


class RunConfig(_Strict):
    name: str = Field("benchmark", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "outputs"
    seed: int = 0
    datasets: list[DatasetConfig] = Field(min_length=1)
    backbone: BackboneConfig = BackboneConfig()
    # The memory-based method jobs.benchmark builds per category (cluster.pipeline.MEMORY_METHODS): PatchCore's
    # bank (embedding, coreset, scoring), or PaDiM's Gaussians (padim).
    method: Literal["patchcore", "padim"] = "patchcore"
    padim: PadimConfig = PadimConfig()
    # Several backbones, one bank each, scores normalised per member and averaged (anomaly_core/ensemble.py);
    # replaces ``backbone``. Empty: a single-backbone run.
    ensemble: list[BackboneConfig] = Field(default_factory=list)
    preprocess: PreprocessConfig = PreprocessConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    coreset: CoresetConfig = CoresetConfig()
    scoring: ScoringConfig = ScoringConfig()
    metrics: MetricsConfig = MetricsConfig()
    thresholds: ThresholdConfig = ThresholdConfig()
    augment: AugmentConfig = AugmentConfig()
    cluster: ClusterConfig = ClusterConfig()
    feature_cache: FeatureCacheConfig = FeatureCacheConfig()
    anomalydino: AnomalyDinoConfig | None = None  # None: no AnomalyDINO preprocessing
    training: TrainingConfig | None = None  # jobs.train's model; jobs.benchmark builds banks and ignores it
    wandb: WandbConfig = WandbConfig()

    @model_validator(mode="after")
    def _unique_dataset_names(self) -> "RunConfig":
        names = [dataset.name for dataset in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _ensemble_replaces_backbone(self) -> "RunConfig":
        if len(self.ensemble) == 1:
            raise ValueError("ensemble: needs at least two backbones (for one, set backbone instead)")
        if self.ensemble and self.backbone != BackboneConfig():  # a recorded config carries the default one
            raise ValueError("set either backbone or ensemble, not both: an ensemble lists its members' backbones")
        return self

    @model_validator(mode="after")
    def _padim_fits(self) -> "RunConfig":
        """PaDiM models one backbone's raw features per position: no ensemble, no AnomalyDINO preprocessing."""
        if self.method != "padim":
            if self.padim != PadimConfig():
                raise ValueError("padim: settings apply to method: padim only (method is patchcore)")
            return self
        if self.ensemble:
            raise ValueError("method padim does not combine with ensemble: set one backbone")
        if self.anomalydino is not None:
            raise ValueError("method padim does not combine with an anomalydino section (PatchCore-bank scoring)")
        return self

    @model_validator(mode="after")
    def _gpu_decode_on_gpu_extractors(self) -> "RunConfig":
        if self.preprocess.gpu_jpeg_decode and self.augment.copies:
            raise ValueError("preprocess.gpu_jpeg_decode does not combine with augment.copies > 0: augmentation "
                             "works on host pixels")
        if self.preprocess.gpu_jpeg_decode and not self.cluster.gpus_per_extractor:
            raise ValueError("preprocess.gpu_jpeg_decode needs GPU extractors: set cluster.gpus_per_extractor > 0")
        return self

    @model_validator(mode="after")
    def _anomalydino_fits(self) -> "RunConfig":
        """The authors' table covers their datasets only; rotations are the bank's training copies."""
        section = self.anomalydino
        if section is None:
            return self
        if "auto" in (section.masking, section.rotation):
            tables = _anomalydino().CATEGORIES
            for dataset in self.datasets:
                table = tables.get(dataset.format)
                unknown = [c for c in dataset.categories or () if table is not None and c not in table]
                if table is None or unknown:
                    what = f"format {dataset.format!r}" if table is None else f"categories {unknown}"
                    raise ValueError(f"anomalydino: masking/rotation auto read the authors' table ({', '.join(tables)} "
                                     f"categories), which lacks dataset {dataset.name}'s {what}: set anomalydino.masking "
                                     "and anomalydino.rotation to true or false")
        if section.rotation is not False and self.augment.copies:
            raise ValueError("anomalydino.rotation puts rotated copies of the training images in the bank: it does "
                             "not combine with augment.copies > 0 (set one of them off)")
        if section.rotation is not False and self.preprocess.gpu_jpeg_decode:
            raise ValueError("anomalydino.rotation rotates host pixels: it does not combine with preprocess.gpu_jpeg_decode")
        return self

    @model_validator(mode="after")
    def _recipe_sets_image_size(self) -> "RunConfig":
        """A trained model's unset preprocess.resize / crop are its recipe's (PatchCore's 256 -> 224 are not)."""
        if self.training is None:
            return self
        entry = MODELS[self.training.model]
        recipe = entry.recipes[self.training.recipe]
        size = {key: recipe.values[key] for key in IMAGE_SIZE if key not in self.preprocess.model_fields_set}
        crop = size.get("crop", self.preprocess.crop)
        if crop % entry.crop_multiple:
            raise ValueError(f"preprocess.crop: {self.training.model} needs a multiple of {entry.crop_multiple}, "
                             f"got {crop}")
        if not size:
            return self
        preprocess = self.preprocess.model_copy(update=size)
        if preprocess.crop > preprocess.resize:
            raise ValueError(f"preprocess: crop ({preprocess.crop}) must not exceed resize ({preprocess.resize}); "
                             f"recipe {self.training.recipe} sets the unset {' and '.join(size)} to {recipe.values['crop']}")
        return self.model_copy(update={"preprocess": preprocess})

    def padim_subset(self) -> tuple[int, int] | None:
        """(channels, seed) of PaDiM's embedding where the method is padim (``extraction.ExtractionSettings``)."""
        return (self.padim.channels, self.padim.seed) if self.method == "padim" else None

    def backbones(self) -> list[tuple[str, BackboneConfig]]:
        """(config key, block) of each backbone the run builds: the ensemble's members, else ``backbone``."""
        return [(f"ensemble.{i}", member) for i, member in enumerate(self.ensemble)] or [("backbone", self.backbone)]

    def members(self) -> list["RunConfig"]:
        """An ensemble's members as single-backbone configs (the run itself when it is not an ensemble)."""
        return [self.model_copy(update={"backbone": backbone, "ensemble": []}) for backbone in self.ensemble] or [self]


def parse_config(raw: Any, source: str) -> RunConfig:
    """Validate a plain mapping into a RunConfig; every error names its key path and ``source``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            lines.append(f"  {key}: {problem['msg']}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None
