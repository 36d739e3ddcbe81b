"""Config files: every bundled config validates; bad keys, types and paths give one clear error each."""

import json
from pathlib import Path

import pytest

from anomaly_core.config import ConfigError, parse_config
from jobs.cli import apply_override, load_config, read_yaml

from .conftest import REPO

CONFIGS = sorted(path for path in (REPO / "configs").glob("*.yaml") if path.name != "paths.yaml")
PATCHCORE_REFERENCE = ("autovi", "btad", "demo", "mvtec3d", "mvtec_ad", "mvtec_loco", "visa")  # the paper's settings


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_bundled_configs_validate(path):
    from anomaly_core.config import parse_config

    config = parse_config(read_yaml(path), str(path))
    if path.stem in PATCHCORE_REFERENCE:
        assert config.coreset.ratio == 0.1 and config.scoring.k == 1
        assert (config.preprocess.resize, config.preprocess.crop) == (256, 224)
        assert config.embedding.target_dim == 1024


def test_reference_defaults_in_dataset_configs():
    config = read_yaml(REPO / "configs" / "mvtec_ad.yaml")
    assert config["backbone"]["name"] == "wide_resnet50_2"
    assert config["backbone"]["layers"] == ["layer2", "layer3"]


def test_overrides_and_list_indexing():
    raw = {"datasets": [{"name": "a", "format": "mvtec", "root": "x"}], "coreset": {"ratio": 0.1}}
    out = apply_override(apply_override(raw, "coreset.ratio=0.01"), "datasets.0.root=/data/y")
    assert out["coreset"]["ratio"] == 0.01 and out["datasets"][0]["root"] == "/data/y"
    assert raw["coreset"]["ratio"] == 0.1  # the input is not modified
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(raw, "datasets.3.root=z")


@pytest.mark.parametrize(
    "override,message",
    [
        ("coreset.ratio=1.5", "coreset.ratio: Input should be less than or equal to 1"),
        ("coreset.method=fancy", "coreset.method: Input should be 'exact', 'approximate' or 'none'"),
        ("scoring.kk=3", "scoring.kk: Extra inputs are not permitted"),
        ("preprocess.crop=300", "crop \\(300\\) must not exceed resize \\(256\\)"),
        ("datasets.0.root=/no/such/dir", "datasets.0.root: dataset folder not found: /no/such/dir"),
        ("backbone.weights=/no/w.pth", "backbone.weights: weights file not found: /no/w.pth"),
        ("cluster.decode_workers=0", "cluster.decode_workers: Value error, must be >= 1 or 'auto'"),
        ("cluster.decode_workers=many", "cluster.decode_workers"),
    ],
)
def test_invalid_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "demo.yaml", [override])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, [])


def test_unknown_category_is_named_with_what_exists():
    from jobs.benchmark import category_jobs

    config = load_config(REPO / "configs" / "demo.yaml", ["datasets=[{name: t, format: mvtec, root: data/tire_small}]"])
    assert [job.key for job in category_jobs(config, {"t/tire"})] == ["t/tire"]
    with pytest.raises(ConfigError, match=r"categories \['nope'\] not found .*have \['t/tire', 'tire'\]"):
        category_jobs(config, {"nope"})
    listed = load_config(REPO / "configs" / "demo.yaml", ["datasets.0.categories=[tyre]"])
    with pytest.raises(ConfigError, match=r"datasets.0.categories: \['tyre'\] not found"):
        category_jobs(listed, None)


def test_submitted_jobs_write_relative_outputs_somewhere_durable(tmp_path):
    """In a Jobs API working_dir copy a relative output_dir would vanish with the session: it moves under
    $ANOMALY_BENCH_OUTPUT (default ~/anomaly-bench); absolute ones and local runs stay as they are."""
    from jobs.cli import durable_output_dir

    config = parse_config({"datasets": [{"name": "d", "format": "synthetic", "root": "x"}], "output_dir": "outputs"}, "t")
    submitted = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}})}
    assert durable_output_dir(config, {}).output_dir == "outputs"
    assert durable_output_dir(config, {**submitted, "ANOMALY_BENCH_OUTPUT": str(tmp_path)}).output_dir == str(tmp_path / "outputs")
    assert durable_output_dir(config, submitted).output_dir == str(Path("~/anomaly-bench/outputs").expanduser().resolve())
    absolute = config.model_copy(update={"output_dir": str(tmp_path / "abs")})
    assert durable_output_dir(absolute, submitted).output_dir == str(tmp_path / "abs")


@pytest.mark.parametrize(
    "dataset,message",
    [
        ("{name: t, format: folder, root: data/tire_small, mask_threshold: 256}",
         "datasets.0.mask_threshold: Input should be less than or equal to 255"),
        ("{name: t, format: folder, root: data/tire_small, mask_threshold: -1}",
         "datasets.0.mask_threshold: Input should be greater than or equal to 0"),
        ("{name: t, format: folder, root: data/tire_small, mask_threshold: 0.5}",
         "datasets.0.mask_threshold: Input should be a valid integer"),
        ("{name: t, format: folder, root: data/tire_small, mask_threshold: true}",
         "datasets.0.mask_threshold: Input should be a valid integer"),
        ("{name: t, format: btad, root: data/tire_small, mask_threshold: 127}",
         "datasets.0.mask_threshold: Value error, only the folder format takes a mask_threshold; btad masks"),
    ],
)
def test_bad_mask_threshold_names_its_key(dataset, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "demo.yaml", [f"datasets=[{dataset}]"])


def test_mask_threshold_reaches_the_folder_reader():
    from jobs.benchmark import category_jobs

    for threshold, rule in (("null", "levels"), ("0", 0), ("200", 200)):
        config = load_config(REPO / "configs" / "demo.yaml",
                             [f"datasets=[{{name: t, format: folder, root: data/tire_small, mask_threshold: {threshold}}}]"])
        (job,) = category_jobs(config, None)
        assert {s.mask_rule for s in job.split.test if s.label} == {rule} and len(job.split.test) == 28
