"""Shared command-line plumbing of the jobs: YAML config + ``--set key=value`` overrides -> RunConfig."""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

import yaml

from anomaly_core.backbones import PACKAGE_WEIGHTS, RANDOM_INIT
from anomaly_core.config import ConfigError, RunConfig, parse_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="YAML run configuration (see configs/)")
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


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The validated config of a job's command line (--config, --set ..., --wandb)."""
    # Quoted: --set values are YAML, where a bare off reads as false.
    overrides = list(args.overrides) + ([f'wandb.mode="{args.wandb}"'] if args.wandb else [])
    return load_config(args.config, overrides)


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
    weights = config.backbone.weights
    if weights not in (RANDOM_INIT, PACKAGE_WEIGHTS) and not Path(weights).expanduser().is_file():
        raise ConfigError(f"{source}: backbone.weights: weights file not found: {weights}")


def load_config(path: Path, overrides: list[str]) -> RunConfig:
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for assignment in overrides:
        raw = apply_override(raw, assignment)
    config = parse_config(raw, str(path))
    check_paths(config, str(path))
    return config
