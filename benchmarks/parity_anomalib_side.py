"""anomalib's half of benchmarks/parity_anomalib.py: runs in .parity-venv (benchmarks/parity_venv.sh), never in
the project's environment, and imports nothing of the project.

It reads ``request.json`` and safetensors files from the exchange folder the driver made, runs anomalib 2.7's
torch models (weights from the driver's files, ``pre_trained=False`` everywhere, the hub switched off), and
writes its tensors back as safetensors. Every step calls anomalib's own modules; where a value is needed that
anomalib's forward computes but does not return (PatchCore's patch scores, Reverse Distillation's fused
bottleneck input), it is read from the same module anomalib's forward calls, or captured with a hook.
Usage: .parity-venv/bin/python benchmarks/parity_anomalib_side.py EXCHANGE_DIR
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"  # anomalib must never reach a hub: weights come from the driver's files

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], whole_network: bool = False) -> list[str]:
    """Load ``state`` into ``module``; returns the module's keys left unfilled. A whole network's file fills a
    feature extractor's subset of it; any other file must hold only keys the module has."""
    own = module.state_dict()
    picked = {key: value for key, value in state.items() if key in own or not whole_network}
    unknown = sorted(set(picked) - set(own))
    if unknown:
        raise KeyError(f"{type(module).__name__} has no parameters {unknown[:5]}")
    module.load_state_dict(picked, strict=False)
    return sorted(set(own) - set(picked))


def preprocess(request: dict, out: dict[str, torch.Tensor]) -> None:
    """anomalib's reader (read_image) and its PreProcessor with PatchCore's transform at the driver's geometry."""
    from anomalib.data.utils import read_image
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize

    transform = Compose([Resize(request["resize"], antialias=True), CenterCrop(request["crop"]),
                         Normalize(mean=request["mean"], std=request["std"])])
    processor = PreProcessor(transform=transform)
    images = torch.stack([read_image(path, as_tensor=True) for path in request["paths"]])
    out["images"] = processor.transform(images)


def patchcore(request: dict, tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    weights = load_file(request["weights_file"])
    for name, layers in (("aligned", request["aligned_layers"]), ("default", request["layers"])):
        model = PatchcoreModel(layers=layers, backbone=request["backbone"], pre_trained=False,
                               num_neighbors=request["num_neighbors"]).eval()
        if _load_into(model.feature_extractor.feature_extractor, weights, True):
            raise KeyError("the weights file does not fill anomalib's feature extractor")
        images = tensors["test_images"]
        with torch.no_grad():
            if name == "default":  # the backbone maps alone, then the scoring stage on the driver's embeddings
                maps = model.feature_extractor(images)
                for layer, value in maps.items():
                    out[f"default/features/{layer}"] = value
                model.memory_bank = tensors["default/bank"]
                _score_embeddings(model, tensors["default/embeddings"], images.shape[-2:], "default", out)
                continue
            # aligned: anomalib's whole forward (features, pooling, embedding, kNN, score, map) on our bank
            model.memory_bank = tensors["aligned/bank"]
            features = {k: model.feature_pooler(v) for k, v in model.feature_extractor(images).items()}
            embedding = model.generate_embedding(features)
            out["aligned/embeddings"] = model.reshape_embedding(embedding).reshape(len(images), -1, embedding.shape[1])
            result = model(images)
            out["aligned/pred_score"], out["aligned/anomaly_map"] = result.pred_score, result.anomaly_map[:, 0]
    if request.get("own_recipe"):
        _own_recipe(request, tensors, weights, out)


def _score_embeddings(model, embeddings: torch.Tensor, size, name: str, out: dict[str, torch.Tensor]) -> None:
    """PatchcoreModel.forward's steps after the embedding, on given [n, P, D] embeddings."""
    n, patches, _ = embeddings.shape
    flat = embeddings.reshape(n * patches, -1)
    scores, locations = model.nearest_neighbors(embedding=flat, n_neighbors=1)
    scores, locations = scores.reshape(n, -1), locations.reshape(n, -1)
    side = int(round(patches ** 0.5))
    out[f"{name}/patch_scores"] = scores
    out[f"{name}/pred_score"] = model.compute_anomaly_score(scores, locations, flat)
    out[f"{name}/anomaly_map"] = model.anomaly_map_generator(scores.reshape(n, 1, side, side), size)[:, 0]
    plain = model.num_neighbors
    model.num_neighbors = 1
    out[f"{name}/pred_score_max"] = model.compute_anomaly_score(scores, locations, flat)
    model.num_neighbors = plain


def _own_recipe(request: dict, tensors: dict[str, torch.Tensor], weights, out: dict[str, torch.Tensor]) -> None:
    """anomalib's PatchCore as its Lightning module runs it: embeddings of the training images, its
    KCenterGreedy coreset (torch RNG seeded), then forward on the test images."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    torch.manual_seed(request["seed"])
    model = PatchcoreModel(layers=request["layers"], backbone=request["backbone"], pre_trained=False,
                           num_neighbors=request["num_neighbors"])
    _load_into(model.feature_extractor.feature_extractor, weights, True)
    model.train()
    with torch.no_grad():
        for batch in tensors["train_images"].split(8):
            model(batch)
    model.subsample_embedding(request["coreset_ratio"])
    model.eval()
    with torch.no_grad():
        results = [model(batch) for batch in tensors["test_images"].split(8)]
    out["own/pred_score"] = torch.cat([r.pred_score for r in results])
    out["own/anomaly_map"] = torch.cat([r.anomaly_map[:, 0] for r in results])
    out["own/bank_rows"] = torch.tensor(len(model.memory_bank))


def stfpm(request: dict, tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    from anomalib.models.image.stfpm import torch_model as stfpm_torch
    from anomalib.models.image.stfpm.lightning_model import Stfpm
    from anomalib.models.image.stfpm.loss import STFPMLoss

    # STFPMModel builds its teacher with pre_trained=True (stfpm/torch_model.py): that would download.
    # The teacher is filled from the driver's file instead, so it is built without weights.
    original = stfpm_torch.TimmFeatureExtractor
    stfpm_torch.TimmFeatureExtractor = lambda **kwargs: original(**{**kwargs, "pre_trained": False})
    try:
        model = stfpm_torch.STFPMModel(layers=request["layers"], backbone=request["backbone"])
    finally:
        stfpm_torch.TimmFeatureExtractor = original
    weights = load_file(request["weights_file"])
    if _load_into(model.teacher_model.feature_extractor, weights, True):
        raise KeyError("the weights file does not fill anomalib's STFPM teacher")
    student = load_file(request["student_file"])
    out["student_unfilled"] = torch.tensor(len(_load_into(model.student_model.feature_extractor, student)))
    loss = STFPMLoss()
    _distillation_outputs(model, loss, tensors, out)
    if request.get("epochs"):
        optimizer = Stfpm.configure_optimizers(SimpleNamespace(model=model))  # anomalib's SGD, its values
        _train(model, loss, optimizer, tensors, request["epochs"], out)


def reverse_distillation(request: dict, tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
    from anomalib.models.image.reverse_distillation.lightning_model import ReverseDistillation
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    torch.manual_seed(request["seed"])  # the bottleneck stack keeps anomalib's own (seeded) initialisation
    size = tuple(tensors["test_images"].shape[-2:])
    # ADD: the Lightning module's default anomaly_map_mode (reverse_distillation/lightning_model.py)
    model = ReverseDistillationModel(backbone=request["backbone"], input_size=size, layers=request["layers"],
                                     anomaly_map_mode=AnomalyMapGenerationMode.ADD, pre_trained=False)
    weights = load_file(request["weights_file"])
    if _load_into(model.encoder.feature_extractor, weights, True):
        raise KeyError("the weights file does not fill anomalib's RD encoder")
    unfilled = _load_into(model, load_file(request["trainable_file"]))
    (Path(request["exchange"]) / "rd_unfilled.json").write_text(json.dumps(
        sorted({".".join(key.split(".")[:2]) for key in unfilled if not key.startswith("encoder.")})))
    model.eval()
    captured = {}
    hook = model.bottleneck.bn_layer.register_forward_pre_hook(lambda _, args: captured.update(fused=args[0]))
    with torch.no_grad():
        features = list(model.encoder(tensors["test_images"]).values())
        model.bottleneck(features)
        out["fused"] = captured["fused"]
        for index, value in enumerate(model.decoder(tensors["code"])):
            out[f"decoded/{index}"] = value
        given_teacher = [tensors[f"given/teacher/{i}"] for i in range(len(request["layers"]))]
        given_decoded = [tensors[f"given/decoded/{i}"] for i in range(len(request["layers"]))]
        out["given/anomaly_map"] = model.anomaly_map_generator(given_teacher, given_decoded)[:, 0]
        out["given/loss"] = ReverseDistillationLoss()(given_teacher, given_decoded).reshape(1)
    hook.remove()
    for index, value in enumerate(features):
        out[f"teacher/{index}"] = value
    if request.get("epochs"):
        optimizer = ReverseDistillation.configure_optimizers(SimpleNamespace(model=model))  # anomalib's Adam
        _train(model, ReverseDistillationLoss(), optimizer, tensors, request["epochs"], out)


def fastflow(request: dict, tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    from anomalib.models.image.fastflow.lightning_model import Fastflow
    from anomalib.models.image.fastflow.loss import FastflowLoss
    from anomalib.models.image.fastflow.torch_model import FastflowModel

    model = FastflowModel(input_size=tuple(tensors["test_images"].shape[-2:]), backbone=request["backbone"],
                          pre_trained=False, flow_steps=request["flow_steps"], conv3x3_only=request["conv3x3_only"],
                          hidden_ratio=request["hidden_ratio"])
    if _load_into(model.feature_extractor, load_file(request["weights_file"]), True):
        raise KeyError("the weights file does not fill anomalib's FastFlow feature extractor")
    unfilled = _load_into(model, load_file(request["flow_file"]))
    if any(not key.startswith("feature_extractor.") for key in unfilled):
        raise KeyError(f"the flow file leaves anomalib's norms or flows unfilled: {unfilled[:5]}")
    loss = FastflowLoss()
    _distillation_outputs(model, loss, tensors, out)
    if request.get("epochs"):
        optimizer = Fastflow.configure_optimizers(SimpleNamespace(model=model))  # anomalib's Adam, its values
        _train(model, loss, optimizer, tensors, request["epochs"], out)
def dinomaly(request: dict, tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    from anomalib.models.image.dinomaly import torch_model as dinomaly_torch
    from anomalib.models.image.dinomaly.components import StableAdamW, WarmCosineScheduler
    from anomalib.models.image.dinomaly.lightning_model import TRAINING_CONFIG

    def build(dropout: float):
        # DinomalyModel builds its encoder with pre_trained=True (dinomaly/torch_model.py): that would download.
        original = dinomaly_torch.TimmFeatureExtractor
        dinomaly_torch.TimmFeatureExtractor = lambda **kwargs: original(**{**kwargs, "pre_trained": False})
        try:
            model = dinomaly_torch.DinomalyModel(encoder_name=request["backbone"], bottleneck_dropout=dropout,
                                                 target_layers=request["target_layers"])
        finally:
            dinomaly_torch.TimmFeatureExtractor = original
        if _load_into(model.encoder.feature_extractor, load_file(request["weights_file"]), True):
            raise KeyError("the weights file does not fill anomalib's Dinomaly encoder")
        unfilled = [key for key in _load_into(model, load_file(request["trainable_file"]))
                    if not key.startswith(("encoder.", "gaussian_blur."))]
        (Path(request["exchange"]) / "dinomaly_unfilled.json").write_text(json.dumps(unfilled))
        return model

    model = build(0.2).eval()
    with torch.no_grad():
        result = model(tensors["test_images"])
    out["pred_score"], out["anomaly_map"] = result.pred_score.reshape(-1), result.anomaly_map[:, 0]
    model.train()
    for module in model.modules():  # the loss and its gradient without dropout draws (see the driver)
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    for step in request["mining_steps"]:
        model.zero_grad()
        loss = model(tensors["batch"], global_step=step)
        loss.backward()
        out[f"loss/{step}"] = loss.detach().reshape(1)
        out[f"grad/{step}"] = model.bottleneck[0].fc1.weight.grad.clone()
    if not request["steps"]:
        return
    model = build(0.0)
    trainable = torch.nn.ModuleList([model.bottleneck, model.decoder])  # lightning_model.py trainable_modules
    optimizer = StableAdamW([{"params": trainable.parameters()}], **TRAINING_CONFIG["optimizer"])
    scheduler = WarmCosineScheduler(optimizer, **{**TRAINING_CONFIG["scheduler"], "total_iters": request["steps"]})
    epoch_losses, step, epoch = [], 0, 0
    while step < request["steps"]:  # Lightning's loop with max_steps and gradient_clip_val, written out
        model.train()
        total, count = 0.0, 0
        for batch in tensors[f"order/{epoch}"]:
            if step == request["steps"]:
                break
            optimizer.zero_grad(set_to_none=True)
            value = model(tensors["train_images"][batch[batch >= 0]], global_step=step)
            value.backward()
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), TRAINING_CONFIG["trainer"]["gradient_clip_val"])
            optimizer.step()
            scheduler.step()
            total, count, step = total + float(value.detach()), count + 1, step + 1
        epoch_losses.append(total / count)
        epoch += 1
    _trained_outputs(model, tensors, epoch_losses, out)
def efficient_ad(request: dict, tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """anomalib's EfficientAdModel with the driver's weights; its Lightning module's statistics methods on it."""
    from anomalib.models.image.efficient_ad.lightning_model import EfficientAd
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel, EfficientAdModelSize

    model = EfficientAdModel(teacher_out_channels=request["out_channels"],
                             model_size=EfficientAdModelSize(request["size"]))
    unfilled = _load_into(model, load_file(request["weights_file"]))
    if [key for key in unfilled if not key.startswith(("mean_std.", "quantiles."))]:
        raise KeyError(f"the weights file leaves anomalib's EfficientAD parameters unfilled: {unfilled[:5]}")
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    module._get_quantiles_of_maps = lambda maps: EfficientAd._get_quantiles_of_maps(module, maps)
    model.eval()
    stats = EfficientAd.teacher_channel_mean_std(module, [SimpleNamespace(image=image[None])
                                                          for image in tensors["train_images"]])
    out["teacher_mean"], out["teacher_std"] = stats["mean"], stats["std"]
    model.mean_std.update({"mean": tensors["given/mean"], "std": tensors["given/std"]})
    quantiles = EfficientAd.map_norm_quantiles(module, [SimpleNamespace(image=image[None], gt_label=torch.tensor([0]))
                                                        for image in tensors["held_out_images"]])
    out["quantiles"] = torch.stack([quantiles[key] for key in ("qa_st", "qb_st", "qa_ae", "qb_ae")])
    given = tensors["given/quantiles"]
    model.quantiles.update({key: given[i] for i, key in enumerate(("qa_st", "qb_st", "qa_ae", "qb_ae"))})
    with torch.no_grad():
        result = model(tensors["test_images"])
        out["pred_score"], out["anomaly_map"] = result.pred_score.reshape(-1), result.anomaly_map[:, 0]
        model.train()
        model.ae.eval()  # dropout off, as on the driver's side
        model.choose_random_aug_image = lambda image: tensors["jittered"]
        out["losses"] = torch.stack(model(tensors["train_images"][:1], tensors["penalty"]))


def _distillation_outputs(model, loss, tensors, out) -> None:
    """Eval-mode prediction on the test images and the train-mode loss of the first training batch."""
    model.eval()
    with torch.no_grad():
        result = model(tensors["test_images"])
    out["pred_score"], out["anomaly_map"] = result.pred_score.reshape(-1), result.anomaly_map[:, 0]
    clone = copy.deepcopy(model).train()  # train-mode BatchNorm would move the running statistics of the model
    with torch.no_grad():
        first = tensors["order/0"][0]
        out["loss"] = loss(*clone(tensors["train_images"][first[first >= 0]])).reshape(1)


def _train(model, loss, optimizer, tensors, epochs: int, out) -> None:
    """Lightning's loop for these models, written out: the driver's batches, zero_grad, loss, backward, step."""
    epoch_losses = []
    for epoch in range(epochs):
        model.train()
        order = tensors[f"order/{epoch}"]
        total = 0.0
        for batch in order:
            optimizer.zero_grad(set_to_none=True)
            value = loss(*model(tensors["train_images"][batch[batch >= 0]]))
            value.backward()
            optimizer.step()
            total += float(value.detach())
        epoch_losses.append(total / len(order))
    _trained_outputs(model, tensors, epoch_losses, out)


def _trained_outputs(model, tensors, epoch_losses: list[float], out) -> None:
    """The epoch losses, and the trained model's eval-mode scores and maps on the test images."""
    model.eval()
    with torch.no_grad():
        results = [model(batch) for batch in tensors["test_images"].split(8)]
    out["trained/epoch_loss"] = torch.tensor(epoch_losses, dtype=torch.float64)
    out["trained/pred_score"] = torch.cat([r.pred_score.reshape(-1) for r in results])
    out["trained/anomaly_map"] = torch.cat([r.anomaly_map[:, 0] for r in results])


def padim(request: dict, tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """anomalib's PadimModel as its Lightning module runs it (training forward on every training image, fit,
    then forward on the test images), with the driver's weights and the driver's channel subset in ``idx``."""
    from anomalib.models.image.padim.torch_model import PadimModel

    model = PadimModel(backbone=request["backbone"], layers=request["layers"], pre_trained=False,
                       n_features=len(request["channel_indices"]))
    if _load_into(model.feature_extractor.feature_extractor, load_file(request["weights_file"]), True):
        raise KeyError("the weights file does not fill anomalib's feature extractor")
    model.idx = torch.tensor(request["channel_indices"], dtype=torch.int64)
    model.train()
    with torch.no_grad():
        for batch in tensors["train_images"].split(8):
            model(batch)
    model.fit()
    model.eval()
    with torch.no_grad():
        embeddings = torch.cat([model.generate_embedding(model.feature_extractor(batch))
                                for batch in tensors["test_images"].split(8)])
        distances = model.anomaly_map_generator.compute_distance(
            embeddings, [model.gaussian.mean, model.gaussian.inv_covariance])
        results = [model(batch) for batch in tensors["test_images"].split(8)]
    out["embeddings"] = embeddings  # [n, d, H, W]
    out["mean"], out["inverse_covariance"] = model.gaussian.mean, model.gaussian.inv_covariance  # [d, P], [P, d, d]
    out["distances"] = distances[:, 0]
    out["pred_score"] = torch.cat([r.pred_score.reshape(-1) for r in results])
    out["anomaly_map"] = torch.cat([r.anomaly_map[:, 0] for r in results])


def draem(request: dict, tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """anomalib's DraemModel with the driver's weights: reconstruction, map and score on the test images and on the
    driver's synthetic batch (eval mode), and DraemLoss with its three terms and the map on that batch (train mode,
    a copy)."""
    from anomalib.models.image.draem.loss import DraemLoss
    from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork, DraemModel, ReconstructiveSubNetwork

    model = DraemModel()
    width = request["base_width"]  # anomalib's subnetworks take it; DraemModel builds them at 128 and 64
    model.reconstructive_subnetwork = ReconstructiveSubNetwork(base_width=width)
    model.discriminative_subnetwork = DiscriminativeSubNetwork(in_channels=6, out_channels=2, base_width=width // 2)
    out["unfilled"] = torch.tensor(len(_load_into(model, load_file(request["weights_file"]))))
    model.eval()
    with torch.no_grad():
        for name in ("test", "anomalous"):
            images = tensors[f"{name}_images"]
            out[f"{name}/reconstruction"] = model.reconstructive_subnetwork(images)
            result = model(images)
            out[f"{name}/pred_score"], out[f"{name}/anomaly_map"] = result.pred_score, result.anomaly_map
        clone = copy.deepcopy(model).train()
        reconstruction, prediction = clone(tensors["anomalous_images"])
        out["train/anomaly_map"] = torch.softmax(prediction, dim=1)[:, 1]
        loss, target, mask = DraemLoss(), tensors["target_images"], tensors["masks"]
        out["loss"] = loss(target, reconstruction, mask, prediction).reshape(1)
        out["loss/l2"] = loss.l2_loss(reconstruction, target).reshape(1)
        out["loss/ssim"] = (loss.ssim_loss(reconstruction, target) * 2).reshape(1)
        out["loss/focal"] = loss.focal_loss(prediction, mask.squeeze(1).long()).reshape(1)


TASKS = {"preprocess": preprocess, "patchcore": patchcore, "stfpm": stfpm, "reverse_distillation": reverse_distillation,
         "padim": padim, "fastflow": fastflow, "dinomaly": dinomaly, "efficient_ad": efficient_ad, "draem": draem}


def main(exchange: Path) -> None:
    import anomalib

    request = json.loads((exchange / "request.json").read_text())
    torch.set_num_threads(request["threads"])
    task = request["task"]
    tensors = load_file(str(exchange / "inputs.safetensors")) if (exchange / "inputs.safetensors").exists() else {}
    out: dict[str, torch.Tensor] = {}
    if task == "preprocess":
        preprocess(request, out)
    else:
        TASKS[task](request, tensors, out)
    out = {key: value.detach().contiguous() for key, value in out.items()}
    save_file(out, str(exchange / "anomalib.safetensors"), metadata={"anomalib": anomalib.__version__,
                                                                   "torch": torch.__version__})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
