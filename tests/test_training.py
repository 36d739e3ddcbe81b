"""Trained models (Reverse Distillation, STFPM) and their plain-PyTorch trainer, on real tire images.

Small crops (64 px), the real EfficientNet-Lite0 teacher from its weights package, a handful of images:
every number below comes from real forward and backward passes.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.model_selection import train_test_split

from anomaly_core.backbones import TF_LITE_MEAN, TF_LITE_STD
from anomaly_core.data import ImageTransform, load_split
from anomaly_core.registry import MODELS
from anomaly_core.training import (
    CheckpointError,
    ModelFilesError,
    ReverseDistillation,
    Stfpm,
    TrainableModel,
    Trainer,
    TrainerCallbacks,
    TrainerConfig,
    TrainingCheckpoint,
    ValidationSet,
    WarmupStepDecay,
    held_out_split,
    load_checkpoint,
    load_images,
    load_model_files,
    predict_images,
    read_model_metadata,
    save_checkpoint,
    save_model_files,
)

from anomaly_core.training.distributed import collective_device

from .conftest import REPO, TIRE_ROOT

CROP = 64
TEACHER = "tf_efficientnet_lite0"


def make_model(kind: str, recipe: str | None = None, weights: str = "package", **settings) -> TrainableModel:
    """``kind`` ("rd", "stfpm" or "fastflow") with a recipe's training values (the authors' by default), ``settings``
    on top."""
    name = "reverse_distillation" if kind == "rd" else kind
    model = MODELS[name].model_class()
    values = MODELS[name].recipes[recipe or MODELS[name].default_recipe].values
    return model(model.settings_of({**values, "backbone": TEACHER, "crop": CROP, "init_seed": 0, **settings}), weights)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine, OpenMP's 2 threads made these steps ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    split = load_split("mvtec", TIRE_ROOT, "tire")
    return load_images(split.train[:8], ImageTransform(resize=CROP, crop=CROP, mean=TF_LITE_MEAN, std=TF_LITE_STD))


# The authors' recipes; measured: RD -1.5 %, STFPM -4.3 % (mean loss), -7.3 % with anomalib's (B/2 = 2 x the step).
@pytest.mark.parametrize(("kind", "recipe", "ratio"), [("rd", None, 0.99), ("stfpm", None, 0.97),
                                                       ("stfpm", "anomalib", 0.95)])
def test_one_training_step_lowers_the_loss_on_its_batch(kind, recipe, ratio, train_images):
    model = make_model(kind, recipe).train()
    optimizer, scheduler = model.configure_optimizers(epochs=10, steps_per_epoch=2)
    batch = train_images[:4]
    before = model.training_step(batch)
    before["loss"].backward()
    optimizer.step()
    with torch.no_grad():
        after = model.training_step(batch)["loss"].item()
    assert sorted(before) == sorted(["loss", *(f"loss/{layer}" for layer in model.teacher.layers)])
    assert after < ratio * before["loss"].item(), f"{kind}: loss {before['loss'].item():.5f} -> {after:.5f}"
    assert not any(parameter.grad is not None for parameter in model.teacher.parameters())
    assert not model.teacher.training


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and torch.equal(actual[name], value), name


def _as_json(value):
    return json.loads(json.dumps(value))


def test_checkpoint_round_trip_is_bit_exact(train_images, tmp_path):
    model = make_model("rd", warmup_epochs=1).train()
    optimizer, scheduler = model.configure_optimizers(epochs=3, steps_per_epoch=2)
    for batch in train_images.split(4):
        optimizer.zero_grad()
        model.training_step(batch)["loss"].backward()
        optimizer.step()
        scheduler.step()
    np.random.seed(11)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.manual_seed(5)
    progress = {"next_epoch": 1, "history": [{"loss": 0.1 + 0.2}]}
    checkpoint = TrainingCheckpoint.capture(model, optimizer, scheduler, progress)
    loaded = load_checkpoint(save_checkpoint(checkpoint, tmp_path / "latest.safetensors"))

    _assert_same_tensors(loaded.model_state, model.trainable_state())
    assert not any(name.startswith("teacher.") for name in loaded.model_state)  # rebuilt from its file instead
    original_optimizer = optimizer.state_dict()
    assert loaded.optimizer_state["param_groups"] == original_optimizer["param_groups"]
    assert sorted(loaded.optimizer_state["state"]) == sorted(original_optimizer["state"])
    for index, values in original_optimizer["state"].items():
        _assert_same_tensors(loaded.optimizer_state["state"][index], values)
    assert loaded.scheduler_state == scheduler.state_dict()
    assert torch.equal(loaded.rng_state["torch"], torch.get_rng_state())
    numpy_state = np.random.get_state()
    assert np.array_equal(loaded.rng_state["numpy"]["keys"], numpy_state[1])
    assert (loaded.rng_state["numpy"]["pos"], loaded.rng_state["numpy"]["has_gauss"],
            loaded.rng_state["numpy"]["cached_gaussian"]) == numpy_state[2:]
    assert loaded.progress == progress
    assert loaded.architecture == _as_json(model.describe())

    fresh = make_model("rd", warmup_epochs=1)
    fresh_optimizer, fresh_scheduler = fresh.configure_optimizers(epochs=3, steps_per_epoch=2)
    torch.manual_seed(0)
    loaded.restore(fresh, fresh_optimizer, fresh_scheduler)
    _assert_same_tensors(fresh.trainable_state(), model.trainable_state())
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert torch.equal(torch.get_rng_state(), checkpoint.rng_state["torch"])
    for path in (REPO / "anomaly_core" / "training").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            calls_torch_load = isinstance(node, ast.Attribute) and (getattr(node.value, "id", ""), node.attr) == (
                "torch", "load")
            imports_pickle = isinstance(node, (ast.Import, ast.ImportFrom)) and "pickle" in ast.dump(node)
            assert not (calls_torch_load or imports_pickle), f"{path.name} must not unpickle (line {node.lineno})"


class _Interrupted(Exception):
    pass


def _interrupt_after(epoch: int):
    def on_epoch_end(record):
        if record["epoch"] == epoch:
            raise _Interrupted

    return on_epoch_end


def test_resumed_run_ends_on_the_uninterrupted_runs_weights(train_images, tmp_path):
    config = TrainerConfig(epochs=4, batch_size=4, seed=7, log_every_n_steps=1)
    # ADer's step decay with a warm-up: warm-up, full rate and (from epoch int(0.8 * 4) = 3) decay all happen.
    settings = {"recipe": "ader", "warmup_epochs": 2}
    logged = []
    full_model = make_model("rd", **settings)
    full = Trainer(config, tmp_path / "full", TrainerCallbacks(on_log=logged.append)).fit(full_model, train_images)

    with pytest.raises(_Interrupted):
        callbacks = TrainerCallbacks(on_epoch_end=_interrupt_after(1))
        Trainer(config, tmp_path / "crashed", callbacks).fit(make_model("rd", **settings), train_images)
    assert load_checkpoint(tmp_path / "crashed" / "latest.safetensors").progress["next_epoch"] == 2
    resumed_model = make_model("rd", **settings)  # new objects, as in a new process
    resumed = Trainer(config, tmp_path / "resumed").fit(
        resumed_model, train_images, resume_from=tmp_path / "crashed" / "latest.safetensors")

    _assert_same_tensors(resumed_model.state_dict(), full_model.state_dict())
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert (resumed.epochs_completed, resumed.global_step) == (full.epochs_completed, full.global_step) == (4, 8)
    # The trainer stepped the schedule once per optimisation step.
    schedule = WarmupStepDecay(steps_per_epoch=2, epochs=4, warmup_epochs=2, decay_at=0.8, decay_factor=0.1)
    assert [record["step"] for record in logged] == list(range(1, 9))
    assert [record["lr"] for record in logged] == pytest.approx([0.005 * schedule(step) for step in range(8)])
    assert {"loss", "loss/blocks.1", "batch_time", "data_time", "optim_time", "epoch"} <= set(logged[0])
    # A checkpoint of other settings or other images is refused, not half-applied.
    with pytest.raises(CheckpointError, match="cannot resume from .*its run had trainer=.*'batch_size': 4"):
        Trainer(TrainerConfig(epochs=4, batch_size=2, seed=7), tmp_path / "other").fit(
            make_model("rd", **settings), train_images, resume_from=tmp_path / "crashed" / "latest.safetensors")
    with pytest.raises(CheckpointError, match="its run had n_images=8, this one has 6"):
        Trainer(config, tmp_path / "other").fit(
            make_model("rd", **settings), train_images[:6], resume_from=tmp_path / "crashed" / "latest.safetensors")


class _ScriptedModel(TrainableModel):
    """A stub whose epoch loss, held-out loss and validation quality follow a script: drives early stopping
    exactly. Its one weight takes an SGD step of -0.1 per batch (the loss's gradient is 1, its value the
    script's), so the weights tell which epoch they are from."""

    kind = "scripted"

    def __init__(self, losses: list[float], qualities: list[float], held_out: list[float] | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.losses, self.qualities, self.held_out, self.epoch = losses, qualities, held_out, 0

    def on_train_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def training_step(self, images):
        return {"loss": (self.weight - self.weight.detach()) + self.losses[self.epoch]}

    def held_out_loss(self, images):
        return torch.full((len(images),), self.held_out[self.epoch])

    def predict(self, images):
        scores = self.qualities[self.epoch] * images[:, 0, 0, 0]  # channel 0 holds the label
        return {"pred_score": scores, "anomaly_map": scores[:, None, None].expand(-1, *images.shape[-2:])}

    def configure_optimizers(self, epochs, steps_per_epoch):
        return torch.optim.SGD([self.weight], lr=0.1), None

    def describe(self):
        return {"kind": self.kind}

    def provenance(self):
        return {}


def test_early_stopping_on_the_loss_respects_min_delta(tmp_path):
    # Best 0.4 at epoch 2; 0.45, 0.41 and 0.36 are not better by more than 0.05: stop after epoch 5.
    losses = [1.0, 0.5, 0.4, 0.45, 0.41, 0.36, 0.1, 0.1]
    written = []
    config = TrainerConfig(epochs=8, batch_size=2, monitor="loss", mode="min", patience=3, min_delta=0.05)
    callbacks = TrainerCallbacks(on_checkpoint=lambda path, kind: written.append((kind, path.name)))
    result = Trainer(config, tmp_path, callbacks).fit(_ScriptedModel(losses, [0.0] * 8), torch.zeros(4, 3, 4, 4))
    assert (result.epochs_completed, result.stopped_early, result.best_epoch) == (6, True, 2)
    assert result.best == pytest.approx(0.4)
    assert [record["loss"] for record in result.history] == pytest.approx(losses[:6])
    assert [kind for kind, _ in written] == ["latest", "best"] * 3 + ["latest"] * 3
    assert load_checkpoint(tmp_path / "best.safetensors").progress["next_epoch"] == 3
    assert result.weights_epoch == 5  # weights="last" (TrainerConfig's default): the last epoch's, and said so


def test_early_stopping_on_a_validation_metric(tmp_path):
    # Scores = quality x label: image AUROC 0.5, 1.0, 1.0 (no improvement), 0.0 -> patience 2 stops after epoch 3.
    labels = np.array([0, 0, 0, 1, 1, 1])
    images = torch.zeros(6, 3, 4, 4)
    images[:, 0] = torch.from_numpy(labels).float()[:, None, None]
    validation = ValidationSet(images, labels, masks=None)
    validations = []
    config = TrainerConfig(epochs=6, batch_size=2, monitor="image_auroc", mode="max", patience=2, weights="best")
    trainer = Trainer(config, callbacks=TrainerCallbacks(on_validation=validations.append))
    model = _ScriptedModel([1.0] * 6, [0.0, 1.0, 1.0, -1.0, 1.0, 1.0])
    result = trainer.fit(model, torch.zeros(4, 3, 4, 4), validation)
    assert (result.epochs_completed, result.stopped_early, result.best, result.best_epoch) == (4, True, 1.0, 1)
    assert [v["metrics"]["image_auroc"] for v in validations] == [0.5, 1.0, 1.0, 0.0]
    assert [v["best"] for v in validations] == [0.5, 1.0, 1.0, 1.0]
    assert validations[0]["metrics"]["pixel_auroc"] is None  # no masks: pixel metrics undefined, not invented
    # Early stopping exports the epoch it judged best (no checkpoint folder here: kept in memory).
    assert result.weights_epoch == 1 and model.weight.item() == pytest.approx(-0.4)  # 2 epochs x 2 steps


def test_the_best_epoch_is_the_weights_the_model_ends_on(tmp_path):
    """weights="best" (STFPM's authors' recipe, or early stopping): the epoch with the lowest held-out loss is
    epoch 1 of 4, and the model ends on exactly that epoch's checkpoint, not the last epoch's. A resumed run
    whose best epoch came before the resume takes it from the best checkpoint."""
    held_out_losses = [0.5, 0.2, 0.3, 0.25]
    images, held_out = torch.zeros(4, 3, 4, 4), torch.zeros(3, 3, 4, 4)
    config = TrainerConfig(epochs=4, batch_size=2, monitor="held_out_loss", weights="best")
    model = _ScriptedModel([1.0] * 4, [0.0] * 4, held_out_losses)
    result = Trainer(config, tmp_path / "run").fit(model, images, held_out=held_out)
    best, latest = (load_checkpoint(tmp_path / "run" / f"{kind}.safetensors") for kind in ("best", "latest"))
    assert (result.best_epoch, result.weights_epoch, result.epochs_completed) == (1, 1, 4)
    assert result.summary()["weights_epoch"] == 1
    assert [record["held_out_loss"] for record in result.history] == pytest.approx(held_out_losses)  # float32
    _assert_same_tensors(model.trainable_state(), best.model_state)
    assert best.progress["next_epoch"] == 2 and model.weight.item() == pytest.approx(-0.4)  # 2 epochs x 2 steps
    assert latest.model_state["weight"].item() == pytest.approx(-0.8)

    with pytest.raises(_Interrupted):  # epochs 0-2 run, the best (1) is in best.safetensors, then a crash
        Trainer(config, tmp_path / "crashed", TrainerCallbacks(on_epoch_end=_interrupt_after(2))).fit(
            _ScriptedModel([1.0] * 4, [0.0] * 4, held_out_losses), images, held_out=held_out)
    resumed_model = _ScriptedModel([1.0] * 4, [0.0] * 4, held_out_losses)
    resumed = Trainer(config, tmp_path / "crashed").fit(resumed_model, images, held_out=held_out,
                                                        resume_from=tmp_path / "crashed" / "latest.safetensors")
    assert (resumed.weights_epoch, resumed.epochs_completed) == (1, 4)
    _assert_same_tensors(resumed_model.trainable_state(), best.model_state)
    with pytest.raises(ValueError, match="monitor='held_out_loss' needs held_out images"):
        Trainer(config).fit(_ScriptedModel([1.0] * 4, [0.0] * 4), images)


def test_a_resume_judges_the_recorded_history_with_the_current_patience(tmp_path):
    """Not the recorded run's decision: losses 1.0, 0.5 (best), then 0.6, 0.7, 0.8 and 0.4. Patience 2 stops
    after epoch 3; resumed with patience 4 the run goes on and finds epoch 5. A run that patience None
    carried to epoch 3, resumed with patience 1, stops at once, training nothing more."""
    losses = [1.0, 0.5, 0.6, 0.7, 0.8, 0.4]

    def fit(patience, folder, resume=False, callbacks=None):
        model = _ScriptedModel(losses, [0.0] * 6)
        result = Trainer(TrainerConfig(epochs=6, batch_size=2, patience=patience), tmp_path / folder, callbacks).fit(
            model, torch.zeros(4, 3, 4, 4), resume_from=tmp_path / folder / "latest.safetensors" if resume else None)
        return result, model

    stopped, _ = fit(2, "a")
    assert (stopped.epochs_completed, stopped.stopped_early, stopped.best_epoch) == (4, True, 1)
    longer, model = fit(4, "a", resume=True)
    assert (longer.epochs_completed, longer.stopped_early, longer.best_epoch, longer.global_step) == (6, False, 5, 12)
    assert model.weight.item() == pytest.approx(-1.2)  # the 8 recorded steps, then 2 more epochs' 4

    with pytest.raises(_Interrupted):
        fit(None, "b", callbacks=TrainerCallbacks(on_epoch_end=_interrupt_after(3)))
    shorter, model = fit(1, "b", resume=True)  # 2 checks without improvement since epoch 1 already
    assert (shorter.epochs_completed, shorter.stopped_early, shorter.best_epoch, shorter.global_step) == (4, True, 1, 8)
    assert [record["loss"] for record in shorter.history] == pytest.approx(losses[:4])
    assert model.weight.item() == pytest.approx(-0.8)  # the checkpoint's, untouched


def test_rd_recipes_set_adam_and_its_schedule():
    """rd4ad (RD4AD main.py): Adam 0.005, betas (0.5, 0.999), no weight decay, a constant rate. ader (ADer
    rd_256_100e.py): the same Adam, x0.1 from 80 % of the epochs. A warm-up, as a key, ramps linearly.
    STFPM's SGD: weight decay 1e-4 (gdwang08/STFPM main.py) or 1e-3 (anomalib lightning_model.py)."""
    def rates(model, epochs=10, steps_per_epoch=3):
        optimizer, scheduler = model.configure_optimizers(epochs=epochs, steps_per_epoch=steps_per_epoch)
        seen = []
        for _ in range(epochs * steps_per_epoch):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return optimizer, seen

    model = make_model("rd")
    optimizer, constant = rates(model)
    assert optimizer.defaults["betas"] == (0.5, 0.999) and optimizer.defaults["weight_decay"] == 0.0
    trained = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert trained == {id(p) for p in [*model.bottleneck.parameters(), *model.decoder.parameters()]}
    assert constant == [0.005] * 30
    optimizer, decayed = rates(make_model("rd", "ader"))
    assert optimizer.defaults["betas"] == (0.5, 0.999) and optimizer.defaults["weight_decay"] == 0.0
    assert decayed == pytest.approx([0.005] * 24 + [0.0005] * 6, rel=1e-12)  # epochs 8 and 9 (>= 80 %) at a tenth
    _, warmed = rates(make_model("rd", "ader", warmup_epochs=5))
    # 5 warm-up epochs x 3 steps: step s runs at (s + 1) / 15 of 0.005.
    assert warmed == pytest.approx([0.005 * (s + 1) / 15 for s in range(15)] + [0.005] * 9 + [0.0005] * 6, rel=1e-12)
    for recipe, weight_decay in (("stfpm", 1e-4), ("anomalib", 1e-3)):
        sgd, scheduler = make_model("stfpm", recipe).configure_optimizers(epochs=10, steps_per_epoch=3)
        assert scheduler is None
        assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.4, 0.9, weight_decay)


@pytest.mark.parametrize("kind", ["rd", "stfpm"])
def test_predict_images_gives_predictions_whose_scores_are_map_maxima(kind, train_images):
    model = make_model(kind).train()
    images = train_images[:5]
    predictions = predict_images(model, images, sample_indices=[10, 11, 12, 13, 14], batch_size=2)
    assert predictions.scores.shape == (5,) and predictions.scores.dtype == np.float64
    assert predictions.maps.shape == (5, CROP, CROP) and predictions.maps.dtype == np.float32
    assert predictions.sample_indices.dtype == np.int64 and predictions.sample_indices.tolist() == [10, 11, 12, 13, 14]
    np.testing.assert_array_equal(predictions.scores, predictions.maps.max(axis=(1, 2)).astype(np.float64))
    assert np.isfinite(predictions.maps).all() and predictions.maps.std(axis=(1, 2)).min() > 0
    assert len(set(predictions.scores.tolist())) == 5
    in_batches = predict_images(model, [images[:2], images[2:4], images[4:]])  # the same batches, passed as such
    np.testing.assert_array_equal(in_batches.maps, predictions.maps)
    assert model.training and not model.teacher.training  # previous mode restored, teacher still frozen


def test_model_files_round_trip_and_refuse_another_teacher_or_crop(train_images, tmp_path):
    model = make_model("rd").train()
    optimizer, _ = model.configure_optimizers(epochs=10, steps_per_epoch=1)
    model.training_step(train_images[:4])["loss"].backward()
    optimizer.step()
    save_model_files(model, tmp_path, resize=CROP, training={"epochs_completed": 1, "best": 0.75})
    expected = {"kind": "reverse_distillation", "backbone": TEACHER, "layers": ["blocks.1", "blocks.2", "blocks.4"],
                "weights_sha256": model.teacher.weights_sha256, "crop": CROP, "resize": CROP,
                "mean": TF_LITE_MEAN, "std": TF_LITE_STD}
    loaded = load_model_files(tmp_path, "package", expected)
    _assert_same_tensors(loaded.state_dict(), model.state_dict())
    np.testing.assert_array_equal(predict_images(loaded, train_images[4:6]).maps,
                                  predict_images(model, train_images[4:6]).maps)
    metadata = read_model_metadata(tmp_path)
    assert metadata["training"] == {"epochs_completed": 1, "best": 0.75} and metadata["resize"] == CROP

    with pytest.raises(ModelFilesError, match="crop: model has 64, inference uses 96"):
        load_model_files(tmp_path, "package", {**expected, "crop": 96})
    with pytest.raises(ModelFilesError, match="backbone: model has 'tf_efficientnet_lite0'"):
        load_model_files(tmp_path, "package", {**expected, "backbone": "tf_efficientnet_lite1"})
    with pytest.raises(ModelFilesError, match="are not the ones"):
        load_model_files(tmp_path, "random")  # same architecture, other teacher weights
    other = make_model("rd", init_seed=1)
    save_file({k: v.contiguous() for k, v in other.trainable_state().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFilesError, match="tensors_sha256"):
        load_model_files(tmp_path, "package", expected)


# Two ranks x B/2 images against one rank x B: global BatchNorm, DDP-averaged gradients and equal shards make
# the runs mathematically equal, so in float64 the loss curves agree to rounding (measured: 2e-12 relative;
# with per-rank BatchNorm they differ by 2-4 %). In float32 they drift apart by up to 0.6 % (RD) and 0.3 %
# (STFPM) within these 4 steps: fresh networks at these rates amplify rounding differences (Adam's first steps
# divide each gradient element by its own size, so rounding-level gradients become full-size steps).
DDP_TOLERANCE = 1e-9
DDP_KINDS = ("rd", "stfpm", "fastflow")


def _fit_recording_losses(kind: str, images: torch.Tensor) -> tuple[list[float], dict[str, torch.Tensor]]:
    losses = []
    # ADer's step decay with a warm-up: at rd4ad's constant full rate, Adam's normalised steps magnify the
    # ranks' float64 rounding to 1e-8 in the weights after 4 steps (the losses still agree to 1e-9).
    model = make_model(kind, **({"recipe": "ader", "warmup_epochs": 1} if kind == "rd" else {})).double()
    config = TrainerConfig(epochs=2, batch_size=4, seed=3, log_every_n_steps=1)
    Trainer(config, callbacks=TrainerCallbacks(on_log=lambda record: losses.append(record["loss"]))).fit(model, images)
    return losses, model.trainable_state()


def _ddp_worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # A file rendezvous: a free TCP port picked here could be taken by another process before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        images = load_file(os.path.join(folder, "images.safetensors"))["images"]
        for kind in DDP_KINDS:
            losses, state = _fit_recording_losses(kind, images)
            if rank == 0:
                save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, f"{kind}.safetensors"))
                Path(folder, f"{kind}.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_like_one_process_with_the_global_batch(train_images, tmp_path):
    images = train_images[:6].double()  # batches of 4 and 2: the short last batch is split too
    save_file({"images": images.contiguous()}, str(tmp_path / "images.safetensors"))
    mp.start_processes(_ddp_worker, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    for kind in DDP_KINDS:
        losses, state = _fit_recording_losses(kind, images)
        ddp_losses = json.loads((tmp_path / f"{kind}.json").read_text())
        assert len(ddp_losses) == len(losses) == 4
        np.testing.assert_allclose(ddp_losses, losses, rtol=DDP_TOLERANCE)
        assert losses[-1] < losses[0]
        ddp_state = load_file(str(tmp_path / f"{kind}.safetensors"))
        for name, value in state.items():
            if value.is_floating_point():
                torch.testing.assert_close(ddp_state[name], value, rtol=DDP_TOLERANCE, atol=DDP_TOLERANCE, msg=name)
            else:
                assert torch.equal(ddp_state[name], value), name


def test_collectives_travel_on_the_device_the_backend_reduces_on():
    """NCCL (Ray Train's backend on GPU workers) reduces CUDA tensors only: the loss means and rank 0's
    early-stopping decision go on the rank's own GPU there; gloo (the two-rank test above) takes CPU tensors."""
    assert collective_device("nccl", "cuda:1") == torch.device("cuda", 1)
    assert collective_device("nccl", torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert collective_device("gloo", "cuda:1") == torch.device("cpu")
    assert collective_device("gloo", "cpu") == torch.device("cpu")


def test_stfpm_losses_are_the_authors_mean_and_anomalibs_half_sum(train_images, monkeypatch):
    """On the same weights and a batch of 4: the authors' loss (gdwang08/STFPM main.py train_val, transcribed
    below) and anomalib's (stfpm/loss.py, transcribed below) are what the two recipes compute, and anomalib's is
    exactly B/2 = 2 times the authors' (its 0.5 x the sum over the batch against a mean), in value and gradient.
    Under DDP the sum is scaled by the world size (the ranks' gradients are averaged), the mean is not."""
    batch = train_images[:4]
    authors, anomalib = make_model("stfpm"), make_model("stfpm", "anomalib")
    anomalib.load_trainable_state(authors.trainable_state())  # the same student (no zero-init in Lite0 anyway)
    with torch.no_grad():
        teacher, student = authors.teacher_features(batch), authors.student(batch)
        normalised = [(F.normalize(t, dim=1), F.normalize(s, dim=1)) for t, s in zip(teacher, student)]
        authors_reference = sum(torch.sum((t - s) ** 2, 1).mean() for t, s in normalised)
        anomalib_reference = sum(0.5 / (t.shape[2] * t.shape[3]) * torch.nn.MSELoss(reduction="sum")(t, s)
                                 for t, s in normalised)
    mean, half_sum = authors.training_step(batch)["loss"], anomalib.training_step(batch)["loss"]
    assert mean.item() == pytest.approx(authors_reference.item(), rel=1e-6)
    assert half_sum.item() == pytest.approx(anomalib_reference.item(), rel=1e-6)
    assert half_sum.item() == pytest.approx(len(batch) / 2 * mean.item(), rel=1e-6)
    mean.backward()
    half_sum.backward()
    for (name, a), b in zip(authors.student.named_parameters(), anomalib.student.parameters()):
        torch.testing.assert_close(b.grad, len(batch) / 2 * a.grad, rtol=1e-4, atol=1e-9, msg=name)
    monkeypatch.setattr("anomaly_core.training.stfpm.world_size", lambda: 2)
    with torch.no_grad():
        assert authors.training_step(batch)["loss"].item() == pytest.approx(mean.item(), rel=1e-6)
        assert anomalib.training_step(batch)["loss"].item() == pytest.approx(2 * half_sum.item(), rel=1e-6)


def test_the_authors_stfpm_student_has_no_zero_initialised_batchnorm():
    """timm's ResNet-18 zeroes the last BatchNorm weight of each residual block (anomalib's student); the
    authors' torchvision student does not: with the stfpm recipe every such weight is 1, as torchvision's,
    and the rest of the initialisation is the same draw."""
    authors = make_model("stfpm", backbone="resnet18", weights="random")
    anomalib = make_model("stfpm", "anomalib", backbone="resnet18", weights="random")
    blocks = [name for name, module in authors.student.named_modules() if hasattr(module, "zero_init_last")]
    assert len(blocks) == 6  # layer1-3, two BasicBlocks each: the student stops at the deepest chosen stage
    for name in blocks:
        assert torch.equal(authors.student.get_submodule(name).bn2.weight, torch.ones(authors.student.get_submodule(
            name).bn2.weight.shape)), name
        assert not anomalib.student.get_submodule(name).bn2.weight.any(), name
    zeroed = {f"{name}.bn2.weight" for name in blocks}
    others = {name: value for name, value in authors.student.state_dict().items() if name not in zeroed}
    assert others and all(torch.equal(value, anomalib.student.state_dict()[name]) for name, value in others.items())


def test_the_held_out_split_is_the_authors_seeded_by_the_run_seed():
    """20 % of train/good (rounded up), disjoint from the trained images, the same for the same seed and other
    for another; seed 0 is gdwang08/STFPM main.py's train_test_split(test_size=0.2, random_state=0)."""
    trained, held_out = held_out_split(34, 0.2, seed=0)
    assert len(held_out) == 7 and len(trained) == 27 and sorted(trained + held_out) == list(range(34))
    assert held_out_split(34, 0.2, seed=0) == (trained, held_out)
    assert held_out_split(34, 0.2, seed=1)[1] != held_out
    authors_train, authors_held_out = train_test_split(list(range(34)), test_size=0.2, random_state=0)
    assert (sorted(authors_train), sorted(authors_held_out)) == (trained, held_out)
    assert held_out_split(34, 0.0, seed=0) == (list(range(34)), [])
    assert held_out_split(5, 0.2, seed=2**32 + 3) == held_out_split(5, 0.2, seed=3)  # numpy's seed range


def test_max_steps_ends_inside_an_epoch_which_is_validated_checkpointed_and_resumed_exactly(tmp_path):
    """6 steps over 4 images at batch 1: epochs 0 and a half of 1, the partial one validated and checkpointed; a
    resume from its checkpoint has nothing left to do; one with another max_steps is refused."""
    images = torch.zeros(4, 3, 4, 4)
    validation = ValidationSet(torch.zeros(2, 3, 4, 4), np.array([0, 1]), None)
    validated = []
    config = TrainerConfig(epochs=100, max_steps=6, batch_size=1, validate_every_n_epochs=50)
    callbacks = TrainerCallbacks(on_validation=lambda record: validated.append(record["epoch"]))
    model = _ScriptedModel([1.0] * 3, [1.0] * 3)
    result = Trainer(config, tmp_path, callbacks).fit(model, images, validation)
    assert (result.epochs_completed, result.global_step, validated) == (2, 6, [1])
    assert float(model.weight.detach()) == pytest.approx(-0.6)  # six SGD steps of -0.1
    again = Trainer(config, tmp_path).fit(_ScriptedModel([1.0] * 3, [1.0] * 3), images,
                                          resume_from=tmp_path / "latest.safetensors")
    assert again.global_step == 6 and len(again.history) == 2
    with pytest.raises(CheckpointError, match=r"its run had trainer=.*'max_steps': 6.*this one has .*'max_steps': 7"):
        Trainer(replace(config, max_steps=7), tmp_path).fit(_ScriptedModel([1.0] * 3, [1.0] * 3), images,
                                                            resume_from=tmp_path / "latest.safetensors")
