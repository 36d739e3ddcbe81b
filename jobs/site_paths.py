"""An offline site's local paths, set once in ``configs/paths.yaml`` instead of on every command.

    datasets:                        # dataset name (datasets[].name of a config) -> its root folder
      mvtec_ad: /data/mvtec_anomaly_detection
      dtd: /data/dtd                 # auxiliary folders a trained model names (training.auxiliary)
    backbones: /models/backbones     # searched when backbone.weights is "search"

The file next to the ``--config`` file is read when it exists (``--paths FILE`` or
``$ANOMALY_BENCH_PATHS`` name another). Precedence: the config file < paths.yaml < ``--set``. The
run records the resolved paths (``run_config.yaml``), so a resume never depends on the file again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from anomaly_core.config import BackboneConfig, ConfigError, RunConfig
from anomaly_core.registry import MODELS
from anomaly_core.weight_files import SEARCH, find_weights

PATHS_FILE = "paths.yaml"
PATHS_VARIABLE = "ANOMALY_BENCH_PATHS"


@dataclass(frozen=True)
class SitePaths:
    source: str = ""
    datasets: dict[str, str] = field(default_factory=dict)
    backbones: str | None = None

    def apply_roots(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` (a config mapping) with the roots of the datasets this file names, and the auxiliary folders
        (DTD, Imagenette) its trained model needs (``training.auxiliary``): this file's, as for dataset roots, over
        the config file's (an example config's default folder)."""
        entries = raw.get("datasets")
        if not self.datasets:
            return raw
        if isinstance(entries, list):
            raw = {**raw, "datasets": [{**entry, "root": self.datasets[entry["name"]]}
                                       if isinstance(entry, dict) and entry.get("name") in self.datasets else entry
                                       for entry in entries]}
        training = raw.get("training")
        entry = MODELS.get(training.get("model")) if isinstance(training, dict) else None
        auxiliary = training.get("auxiliary") if entry is not None else None
        if entry is None or not isinstance(auxiliary or {}, dict):
            return raw
        found = {name: self.datasets[name] for name in entry.auxiliary if name in self.datasets}
        return {**raw, "training": {**training, "auxiliary": {**(auxiliary or {}), **found}}}

    def resolve_weights(self, config: RunConfig) -> RunConfig:
        """``weights: search`` (of the backbone or of an ensemble member) becomes the one matching file in
        the backbones folder."""
        searched = [self._searched(backbone, f"{key}.weights") for key, backbone in config.backbones()]
        return config.model_copy(update={"ensemble": searched} if config.ensemble else {"backbone": searched[0]})

    def _searched(self, backbone: BackboneConfig, key: str) -> BackboneConfig:
        if backbone.weights != SEARCH:
            return backbone
        if self.backbones is None:
            raise ConfigError(f"{key}={SEARCH} needs a backbones folder: set `backbones:` in "
                              f"{self.source or 'configs/' + PATHS_FILE}")
        try:
            found = find_weights(backbone.name, self.backbones)
        except ValueError as error:
            raise ConfigError(f"{key}={SEARCH} ({self.source}): {error}") from None
        return backbone.model_copy(update={"weights": str(found)})


def paths_file(explicit: Path | None, config_path: Path | None, environ: Mapping[str, str]) -> Path | None:
    """``--paths``, else $ANOMALY_BENCH_PATHS, else the paths.yaml beside the config file if there is one."""
    if explicit is not None or environ.get(PATHS_VARIABLE):
        chosen = Path(explicit or environ[PATHS_VARIABLE]).expanduser()
        if not chosen.is_file():
            raise ConfigError(f"paths file not found: {chosen}")
        return chosen
    beside = config_path.parent / PATHS_FILE if config_path is not None else None
    return beside if beside is not None and beside.is_file() else None


def read_site_paths(path: Path | None) -> SitePaths:
    """The validated file (an empty SitePaths without one); errors name the file and the key."""
    if path is None:
        return SitePaths()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read paths file: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with datasets and backbones")
    unknown = sorted(set(raw) - {"datasets", "backbones"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} (allowed: datasets, backbones)")
    datasets = raw.get("datasets") or {}
    if not isinstance(datasets, dict) or not all(isinstance(v, str) and v for v in datasets.values()):
        raise ConfigError(f"{path}: datasets must map dataset names to folder paths")
    backbones = raw.get("backbones")
    if backbones is not None and not (isinstance(backbones, str) and backbones):
        raise ConfigError(f"{path}: backbones must be a folder path")
    return SitePaths(str(path), {str(k): str(Path(v).expanduser()) for k, v in datasets.items()},
                     str(Path(backbones).expanduser()) if backbones else None)
