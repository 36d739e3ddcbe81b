"""The trained models, by name: one table that config validation, recipes, model construction and model files
all read, so ``cluster/`` and ``jobs/`` never branch on a model's name.

A new trained model is a module with a ``TrainableModel`` (training step -> ``{"loss": ...}``; ``predict`` ->
``pred_score``, ``anomaly_map``; a ``kind`` equal to its name here; a settings dataclass that ``settings_of`` /
``from_description`` fill from a resolved config or a ``model.json``; the ``provenance`` model files are checked
against), often a ``DistillationModel`` (a frozen CNN teacher), and one ``ModelEntry`` in ``MODELS``. The table lives
outside ``anomaly_core.training`` because the config validates ``training.model`` against it, and validating a
config must not import torch: an entry names its class by import path, imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomaly_core.config import RunConfig
    from anomaly_core.training.model import TrainableModel

IMAGE_SIZE = ("resize", "crop")  # recipe values that fill preprocess, not the training section
# What the Trainer reads from every model's training section (cluster.training.trainer_config): each recipe names them.
TRAINER_KEYS = ("epochs", "batch_size", "drop_last", "clip_grad_norm", "monitor", "weights")


@dataclass(frozen=True)
class Recipe:
    """A trained model's named defaults and the code they were read from (``source``: repository, file, what)."""

    source: str
    values: dict[str, Any]  # TrainingConfig keys, plus the image size (preprocess.resize / crop)


@dataclass(frozen=True)
class ModelEntry:
    """One trained model: its class, its recipes (the first the default: the authors' code), where it comes from."""

    model: str | type  # "module:Class" (imported on first use, see the module docstring), or the class itself
    recipes: dict[str, Recipe]
    reference: str  # the paper
    code: str  # the code followed (the default recipe's)
    config: str  # an example config in configs/
    # Whether config.backbone names its pretrained part (a teacher, an encoder): then model files are checked
    # against it. False for a model trained from scratch (DRAEM), whose configs' backbone is ignored.
    uses_backbone: bool = True
    # Auxiliary image folders it trains with, by name (dtd for DRAEM, imagenette for EfficientAD): each must be
    # in training.auxiliary, which configs/paths.yaml fills from its datasets mapping.
    auxiliary: tuple[str, ...] = ()
    # The input size (preprocess.crop) must be a multiple of this: DRAEM's UNets pool five times (32).
    crop_multiple: int = 1
    recipe_keys: tuple[str, ...] = field(init=False)  # the training keys its recipes set

    def __post_init__(self) -> None:
        """Refuse a recipe that leaves out a value the others (or the Trainer) need: no value may pass for a
        reference it is not."""
        keys = [set(recipe.values) for recipe in self.recipes.values()]
        required = set().union(*keys) | set(TRAINER_KEYS) | set(IMAGE_SIZE)
        for name, recipe in self.recipes.items():
            missing = sorted(required - set(recipe.values))
            if missing:
                raise ValueError(f"recipe {name!r} of {self.model} leaves out {', '.join(missing)}")
        object.__setattr__(self, "recipe_keys", tuple(sorted(required - set(IMAGE_SIZE))))

    @property
    def default_recipe(self) -> str:
        return next(iter(self.recipes))

    def model_class(self) -> type[TrainableModel]:
        if isinstance(self.model, type):
            return self.model
        module, _, name = self.model.partition(":")
        return getattr(importlib.import_module(module), name)

    def build(self, config: RunConfig) -> TrainableModel:
        """The configured model (the training values its recipe resolved to, the auxiliary folders) with its
        pretrained part (``backbone``) at ``preprocess.crop``; the run seed initialises its trainable weights."""
        model, backbone = self.model_class(), config.backbone
        values = {**config.training.model_dump(), "backbone": backbone.name, "layers": tuple(backbone.layers),
                  "crop": config.preprocess.crop, "init_seed": config.seed}  # auxiliary: training.auxiliary
        return model(model.settings_of(values), backbone.weights)


# Dinomaly's per-category script (dinomaly_mvtec_sep.py), which its other recipes vary.
_DINOMALY = {"epochs": 5000, "max_steps": 5000, "batch_size": 16, "drop_last": True, "lr": 2e-3, "final_lr": 2e-4,
             "warmup_steps": 100, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-4, "clip_grad_norm": 0.1,
             "mlp_bias": True, "blur_padding": "zeros", "blurred_map": True, "monitor": "loss", "weights": "last",
             "resize": 448, "crop": 392}

# gathierry/FastFlow's values for resnet18 (the fastflow recipe below), shared by its wide_resnet50_2 setting.
_GATHIERRY_FASTFLOW = {"epochs": 500, "batch_size": 32, "drop_last": True, "lr": 1e-3, "weight_decay": 1e-5,
                       "clip_grad_norm": 0.0, "flow_steps": 8, "hidden_ratio": 1.0, "conv3x3_only": True,
                       "monitor": "loss", "weights": "last", "resize": 256, "crop": 256}
# EfficientAD's two recipes share every value but where the maps are normalised (MODELS["efficient_ad"] cites them).
_EFFICIENT_AD = {"epochs": 70000, "max_steps": 70000, "batch_size": 1, "drop_last": False, "lr": 1e-4,
                 "weight_decay": 1e-5, "decay_at": 0.95, "decay_factor": 0.1, "clip_grad_norm": 0.0,
                 "held_out_fraction": 0.1, "monitor": "loss", "weights": "last", "resize": 256, "crop": 256}

# Where the authors' code and a library disagree, the authors' code is the default and the other is offered by
# name. Each value was read in the file named (RD4AD 6554076, STFPM 2598a5e, ADer 902937a, anomalib b723368,
# gathierry/FastFlow 2cf1f2f, Dinomaly c5c76d0; anomalib's dinomaly as installed in 2.7's parity venv).
MODELS: dict[str, ModelEntry] = {
    "reverse_distillation": ModelEntry(
        "anomaly_core.training.reverse_distillation:ReverseDistillation",
        {
            "rd4ad": Recipe(
                "hq-deng/RD4AD main.py train(): batch 16, Adam(lr=0.005, betas=(0.5, 0.999)) without weight decay or "
                "scheduler (a constant rate), 200 epochs, 256 px (Resize + CenterCrop 256), DataLoader drop_last "
                "False, the last epoch's weights; test.py cal_anomaly_map: bilinear align_corners=True",
                {"epochs": 200, "batch_size": 16, "drop_last": False, "lr": 0.005, "betas": (0.5, 0.999),
                 "weight_decay": 0.0, "warmup_epochs": 0, "decay_at": 1.0, "decay_factor": 1.0, "clip_grad_norm": 0.0,
                 "align_corners": True, "monitor": "loss", "weights": "last", "resize": 256, "crop": 256}),
            "ader": Recipe(
                "zhangzjn/ADer configs/benchmark/rd/rd_256_100e.py: batch 16, Adam lr 0.005 betas (0.5, 0.999), no "
                "warm-up, x0.1 at 80 % of 100 epochs (per step), 256 px; its weight_decay = 0.05 never enters "
                "optim.kwargs, so Adam runs without; configs/__base__/cfg_common.py: gradient norm clipped at 5 "
                "(trainer/_base_trainer.py backward_term), drop_last True; util/metric.py cal_anomaly_map: "
                "align_corners=True. ADer trains one model on all categories at once; here its values train one per category",
                {"epochs": 100, "batch_size": 16, "drop_last": True, "lr": 0.005, "betas": (0.5, 0.999),
                 "weight_decay": 0.0, "warmup_epochs": 0, "decay_at": 0.8, "decay_factor": 0.1, "clip_grad_norm": 5.0,
                 "align_corners": True, "monitor": "loss", "weights": "last", "resize": 256, "crop": 256}),
        },
        reference="Deng & Li, Anomaly Detection via Reverse Distillation from One-Class Embedding, CVPR 2022",
        code="hq-deng/RD4AD",
        config="configs/reverse_distillation.yaml",
    ),
    "stfpm": ModelEntry(
        "anomaly_core.training.stfpm:Stfpm",
        {
            "stfpm": Recipe(
                "gdwang08/STFPM main.py: batch 32, SGD(lr=0.4, momentum=0.9, weight_decay=1e-4), 100 epochs, Resize "
                "256, drop_last False; train_val: loss = sum over channels, mean over pixels and images; student "
                "torchvision resnet18(pretrained=False) (no zero-initialised BatchNorm); the weights of the epoch whose "
                "mean anomaly map on train_test_split(test_size=0.2) of train/good is lowest",
                {"epochs": 100, "batch_size": 32, "drop_last": False, "lr": 0.4, "momentum": 0.9, "weight_decay": 1e-4,
                 "clip_grad_norm": 0.0, "loss": "mean", "zero_init_last": False, "held_out_fraction": 0.2,
                 "monitor": "held_out_loss", "weights": "best", "resize": 256, "crop": 256}),
            "anomalib": Recipe(
                "open-edge-platform/anomalib src/anomalib/models/image/stfpm: lightning_model.py SGD(lr=0.4, "
                "momentum=0.9, weight_decay=0.001), loss.py 0.5 / (h w) x MSELoss(reduction='sum') (summed over the "
                "batch), torch_model.py a timm student (zero_init_last); examples/configs/model/stfpm.yaml 100 epochs "
                "(its EarlyStopping on the test set's pixel AUROC is training.monitor/patience here); "
                "data/datamodules/image/mvtecad.py batch 32; anomalib_module.py 256 x 256; the last epoch's weights",
                {"epochs": 100, "batch_size": 32, "drop_last": False, "lr": 0.4, "momentum": 0.9, "weight_decay": 1e-3,
                 "clip_grad_norm": 0.0, "loss": "half_sum", "zero_init_last": True, "held_out_fraction": 0.0,
                 "monitor": "loss", "weights": "last", "resize": 256, "crop": 256}),
        },
        reference="Wang et al., Student-Teacher Feature Pyramid Matching for Anomaly Detection, BMVC 2021",
        code="gdwang08/STFPM",
        config="configs/stfpm.yaml",
    ),
    "fastflow": ModelEntry(
        "anomaly_core.training.fastflow:Fastflow",
        {
            "fastflow": Recipe(
                "gathierry/FastFlow (the authors published no code) configs/resnet18.yaml: input 256 "
                "(dataset.py Resize(256), no crop), flow_step 8, hidden_ratio 1.0, conv3x3_only True; constants.py "
                "batch 32, 500 epochs, Adam lr 1e-3, weight decay 1e-5; main.py: no scheduler, DataLoader drop_last "
                "True, no selection of weights (the last epoch's)",
                _GATHIERRY_FASTFLOW),
            "fastflow_wrn50": Recipe(
                "gathierry/FastFlow configs/wide_resnet50_2.yaml: the fastflow recipe with conv3x3_only False (1x1 "
                "subnet convolutions on odd flow steps), its setting for wide_resnet50_2",
                {**_GATHIERRY_FASTFLOW, "conv3x3_only": False}),
            "anomalib": Recipe(
                "open-edge-platform/anomalib src/anomalib/models/image/fastflow: lightning_model.py Adam(lr=0.001, "
                "weight_decay=0.00001), gradient_clip_val 0; examples/configs/model/fastflow.yaml flow_steps 8, "
                "hidden_ratio 1.0, conv3x3_only false for resnet18, 500 epochs (its EarlyStopping on the test set's "
                "pixel AUROC, patience 3, is training.monitor/patience here); data/datamodules/image/mvtecad.py batch "
                "32, base/image.py drop_last False; anomalib_module.py 256 x 256; the last epoch's weights",
                {"epochs": 500, "batch_size": 32, "drop_last": False, "lr": 1e-3, "weight_decay": 1e-5,
                 "clip_grad_norm": 0.0, "flow_steps": 8, "hidden_ratio": 1.0, "conv3x3_only": False,
                 "monitor": "loss", "weights": "last", "resize": 256, "crop": 256}),
        },
        reference="Yu et al., FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows, "
                  "arXiv 2111.07677, 2021",
        code="gathierry/FastFlow",
        config="configs/fastflow.yaml",
    ),
    "dinomaly": ModelEntry(
        "anomaly_core.training.dinomaly:Dinomaly",
        {
            "dinomaly": Recipe(
                "guojiajeremy/Dinomaly dinomaly_mvtec_sep.py train() (one model per category): total_iters 5000, batch "
                "16, DataLoader drop_last True, Resize 448 + CenterCrop 392, StableAdamW(lr=2e-3, betas=(0.9, 0.999), "
                "weight_decay=1e-4, amsgrad=True, eps=1e-8), WarmCosineScheduler(final_value=2e-4, warmup_iters=100), "
                "clip_grad_norm(max_norm=0.1), the last iteration's weights; models/vision_transformer.py bMlp and Mlp "
                "with biases; utils.py evaluation_batch: the map blurred by get_gaussian_kernel (a zero-padded Conv2d). "
                "epochs: a bound max_steps always reaches first (each epoch takes >= 1 step)",
                _DINOMALY),
            "dinomaly_uni": Recipe(
                "guojiajeremy/Dinomaly dinomaly_mvtec_uni.py train(): as dinomaly_mvtec_sep.py but total_iters 10000 and "
                "StableAdamW eps=1e-10. It trains one model on all 15 MVTec AD categories at once; here its values "
                "train one per category",
                {**_DINOMALY, "epochs": 10000, "max_steps": 10000, "eps": 1e-10}),
            "anomalib": Recipe(
                "open-edge-platform/anomalib src/anomalib/models/image/dinomaly: lightning_model.py TRAINING_CONFIG "
                "StableAdamW(lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4, amsgrad=True, eps=1e-8), "
                "WarmCosineScheduler(final 2e-4, warmup 100) over the run's steps, gradient_clip_val 0.1, pre-processor "
                "448 / 392; README.md max_steps 5000, batch 16; data/datamodules/base/image.py no drop_last; "
                "components/layers.py DinomalyMLP(bias=False); torch_model.py GaussianBlur2d (reflect padding) for "
                "the score, the unblurred map returned; the last step's weights",
                {**_DINOMALY, "drop_last": False, "mlp_bias": False, "blur_padding": "reflect", "blurred_map": False}),
        },
        reference="Guo et al., Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised Anomaly Detection, "
                  "CVPR 2025",
        code="guojiajeremy/Dinomaly",
        config="configs/dinomaly.yaml",
    ),
    # EfficientAD: no authors' code; nelson1425/EfficientAD fcab514 (efficientad.py, common.py), anomalib b723368
    "efficient_ad": ModelEntry(
        "anomaly_core.training.efficient_ad:EfficientAd",
        {
            "efficientad": Recipe(
                "nelson1425/EfficientAD efficientad.py (the paper's Algorithm 1): batch 1, Adam(lr=1e-4, "
                "weight_decay=1e-5), train_steps 70000 (an infinite loader: max_steps ends it, epochs never do), "
                "StepLR(step_size=int(0.95 x 70000), gamma=0.1), Resize((256, 256)) (here resize 256 + crop 256: the "
                "same for square images); 10 % of train/good held out (random_split) for map_normalization's "
                "quantiles 0.9/0.995 of the maps at the PDN's resolution, normalised before padding (grid); "
                "the penalty images: --imagenet_train_path (ImageNet; Imagenette here, as anomalib)",
                {**_EFFICIENT_AD, "map_normalisation": "grid"}),
            "anomalib": Recipe(
                "open-edge-platform/anomalib src/anomalib/models/image/efficient_ad: lightning_model.py Adam(lr=1e-4, "
                "weight_decay=1e-5), StepLR at 0.95 of min(max_steps, max_epochs x steps), gamma 0.1, train batch 1 "
                "(it refuses others), Imagenette penalty images, configure_pre_processor Resize((256, 256)); "
                "torch_model.py compute_maps: maps padded and upsampled before quantiles and normalisation (image). "
                "Its quantiles come from the good images of the validation set anomalib splits off the test set; "
                "here from 10 % of train/good, as the reference (test images never set a model's state). The "
                "paper's 70000 steps as max_steps",
                {**_EFFICIENT_AD, "map_normalisation": "image"}),
        },
        reference="Batzner, Heckler & König, EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level "
                  "Latencies, WACV 2024",
        code="nelson1425/EfficientAD",
        config="configs/efficient_ad.yaml",
        auxiliary=("imagenette",),
    ),
    "draem": ModelEntry(
        "anomaly_core.training.draem:Draem",
        {
            "draem": Recipe(
                "VitjanZ/DRAEM (2dbf673) train_DRAEM.py: batch 8, Adam lr 1e-4 (both sub-networks), 700 epochs, "
                "MultiStepLR at 0.8 and 0.9 of the epochs x0.2, weights_init N(0, 0.02), the last epoch's weights; "
                "data_loader.py MVTecDRAEMTrainDataset: 256 x 256, pixels in [0, 1] without normalisation, the image "
                "rotated by [-90, 90) degrees with probability 0.3, anomaly with probability 0.5, texture opacity "
                "1 - beta, beta in [0, 0.8), 3 of its 10 imgaug augmenters; loss.py: MSE + (1 - SSIM) + focal; "
                "model_unet.py: base widths 128 and 64; test_DRAEM.py: discriminator input [reconstruction, image], "
                "score the max of the 21 x 21 average-pooled map",
                {"epochs": 700, "batch_size": 8, "drop_last": False, "base_width": 128, "lr": 1e-4,
                 "milestones": (0.8, 0.9), "decay_factor": 0.2, "clip_grad_norm": 0.0, "synthesis": "draem",
                 "anomaly_probability": 0.5,
                 "opacity": (0.2, 1.0), "image_rotation": 0.3, "loss_form": "draem",
                 "discriminator_input": "reconstruction_first", "score_pool": 21, "init_normal": True,
                 "monitor": "loss", "weights": "last", "resize": 256, "crop": 256}),
            "anomalib": Recipe(
                "open-edge-platform/anomalib src/anomalib/models/image/draem: lightning_model.py Adam lr 1e-4, "
                "MultiStepLR milestones 400 and 600 x0.1, beta (0.1, 1.0); examples/configs/model/draem.yaml 700 "
                "epochs (its EarlyStopping on pixel AUROC is training.monitor/patience here); data/utils/generators/"
                "perlin.py PerlinAnomalyGenerator (probability 0.5, torchvision augmenters, no image rotation); "
                "loss.py MSE + 2 x kornia SSIMLoss + kornia FocalLoss(alpha=1); torch_model.py default init, "
                "discriminator input [image, reconstruction], score the map's max; mvtecad.py batch 32; 256 x 256",
                {"epochs": 700, "batch_size": 32, "drop_last": False, "base_width": 128, "lr": 1e-4,
                 "milestones": (4 / 7, 6 / 7), "decay_factor": 0.1, "clip_grad_norm": 0.0, "synthesis": "anomalib",
                 "anomaly_probability": 0.5,
                 "opacity": (0.1, 1.0), "image_rotation": 0.0, "loss_form": "anomalib",
                 "discriminator_input": "image_first", "score_pool": 1, "init_normal": False,
                 "monitor": "loss", "weights": "last", "resize": 256, "crop": 256}),
        },
        reference="Zavrtanik, Kristan & Skočaj, DRAEM - A Discriminatively Trained Reconstruction Embedding for "
                  "Surface Anomaly Detection, ICCV 2021",
        code="VitjanZ/DRAEM",
        config="configs/draem.yaml",
        uses_backbone=False,
        auxiliary=("dtd",),
        crop_multiple=32,
    ),
}
