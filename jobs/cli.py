"""Shared command-line plumbing of the jobs: YAML config + ``--set key=value`` overrides -> RunConfig."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from anomaly_core.backbones import PACKAGE_WEIGHTS, RANDOM_INIT
from anomaly_core.config import ConfigError, RunConfig, parse_config
from anomaly_core.data import IMAGE_EXTENSIONS
from jobs.site_paths import paths_file, read_site_paths


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, type=Path, help="YAML run configuration (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set coreset.ratio=0.01 --set backbone.weights=/w/wrn50.pth "
        "(VALUE is parsed as YAML; datasets.0.root addresses a list item)",
    )
    parser.add_argument("--wandb", choices=("auto", "online", "offline", "off"),
                        help="W&B tracking mode, overriding wandb.mode of the config")
    parser.add_argument("--paths", type=Path, metavar="FILE",
                        help="this site's dataset roots and backbones folder (default: $ANOMALY_BENCH_PATHS, "
                        "else paths.yaml beside the config file; see configs/paths.yaml)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error as well")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` assignments, with ``--wandb`` as one more (quoted: in YAML a bare off reads as false)."""
    return list(args.overrides) + ([f'wandb.mode="{args.wandb}"'] if args.wandb else [])


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The validated config of a job's command line (--config, --paths, --set ..., --wandb)."""
    return load_config(args.config, config_overrides(args), args.paths)


def category_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The command line shared by the one-category jobs (build_bank, evaluate); also sets up logging."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--dataset", help="dataset name from the config (default: the first)")
    parser.add_argument("--category", required=True, help="category name, e.g. tire")
    return parser


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error


def apply_override(raw: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Return a copy of ``raw`` with one dotted ``key=value`` assignment applied."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    key, text = assignment.split("=", 1)
    parts = [part for part in key.strip().split(".") if part]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML: {error}") from error
    result = copy.deepcopy(raw)
    node: Any = result
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping or list")
    return result


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {where}: {part!r} is not an index of a list with {len(node)} items")
    return int(part)


def _child(node: Any, part: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {where}: parent is not a mapping")
    if part not in node and create:
        node[part] = {}
    return node[part]


def check_paths(config: RunConfig, source: str) -> None:
    """Paths are checked once here, so a typo fails before any cluster work starts."""
    for position, dataset in enumerate(config.datasets):
        if dataset.format != "synthetic" and not Path(dataset.root).is_dir():
            raise ConfigError(
                f"{source}: datasets.{position}.root: dataset folder not found: {dataset.root} "
                f"(dataset {dataset.name!r})"
            )
    for name, folder in (config.training.auxiliary if config.training else {}).items():
        if not Path(folder).expanduser().is_dir():
            raise ConfigError(f"{source}: training.auxiliary.{name}: folder not found: {folder}")
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in Path(folder).expanduser().rglob("*")):
            raise ConfigError(f"{source}: training.auxiliary.{name}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                              f"under {folder}")
    for key, backbone in config.backbones():
        weights = backbone.weights
        if weights not in (RANDOM_INIT, PACKAGE_WEIGHTS) and not Path(weights).expanduser().is_file():
            raise ConfigError(f"{source}: {key}.weights: weights file not found: {weights}")


def single_backbone(config: RunConfig, job: str) -> RunConfig:
    """``config`` for a job that works with one bank (build_bank, evaluate, predict): ensembles are refused."""
    if config.ensemble:
        raise ConfigError(f"{job} works with one backbone's bank; an ensemble config runs with jobs.benchmark "
                          f"(to build or score one member, set backbone to it instead of ensemble)")
    return config


def check_writable(folder: Path, key: str) -> None:
    """Create ``folder`` and prove a file can be written there; ``key`` names the setting it came from."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}: cannot write to {folder}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: folder {folder} is not writable")


# Where a relative output_dir goes when the job runs in a Jobs API working_dir (a copy deleted with the session).
OUTPUT_ROOT_VARIABLE = "ANOMALY_BENCH_OUTPUT"
DEFAULT_OUTPUT_ROOT = "~/anomaly-bench"


def submitted_working_dir(environ: Mapping[str, str]) -> str | None:
    """The ``working_dir`` of a job submitted through Ray's Jobs API, whose cwd is a temporary copy of it."""
    try:
        job = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    runtime_env = job.get("runtime_env") if isinstance(job, dict) else None
    return (runtime_env or {}).get("working_dir") or None


def durable_output_dir(config: RunConfig, environ: Mapping[str, str]) -> RunConfig:
    """A relative ``output_dir`` of a submitted job resolves under $ANOMALY_BENCH_OUTPUT (default
    ~/anomaly-bench) on the driver's node: in the job's working directory it would vanish with the
    Ray session, taking a whole benchmark's banks and report with it."""
    if Path(config.output_dir).is_absolute() or not submitted_working_dir(environ):
        return config
    target = Path(environ.get(OUTPUT_ROOT_VARIABLE) or DEFAULT_OUTPUT_ROOT).expanduser().resolve() / config.output_dir
    logging.getLogger("jobs").warning(
        "output_dir %r is relative and this job runs in a temporary copy of its working_dir: writing to %s instead "
        "(set %s, or an absolute output_dir, to choose)", config.output_dir, target, OUTPUT_ROOT_VARIABLE)
    return config.model_copy(update={"output_dir": str(target)})


def load_config(path: Path, overrides: list[str], paths: Path | None = None) -> RunConfig:
    """Config file < the site's paths file (``jobs.site_paths``) < ``--set``; validated, paths checked."""
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    site = read_site_paths(paths_file(paths, path, os.environ))
    raw = site.apply_roots(raw)
    for assignment in overrides:
        raw = apply_override(raw, assignment)
    config = site.resolve_weights(parse_config(raw, str(path)))
    check_paths(config, str(path))
    return durable_output_dir(config, os.environ)
