"""Runs side by side: PatchCore, an ensemble, Reverse Distillation, STFPM, ... on the categories they share.

    python -m jobs.compare outputs/<patchcore run> outputs/<rd run> [...] [--out DIR]

Reads each run folder's summary.json (jobs.benchmark or jobs.train) and writes ``comparison.md`` and
``comparison.csv`` into ``--out`` (default: the first run's folder): one row per category, each metric
once per run, and the mean over the categories every run has (so no run's mean covers other categories).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anomaly_core.bank import atomic_write
from anomaly_core.config import ConfigError
from anomaly_core.registry import MODELS
from jobs.errors import run_job
from jobs.report import write_csv

COMPARED = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap")


def method_of(summary: dict[str, Any]) -> str:
    """What produced a run: the trained model, an ensemble, or the memory-based method (PatchCore, PaDiM) with
    its backbone."""
    config = summary.get("config", {})
    if config.get("training") and summary.get("job") == "train":
        model = config["training"]["model"]
        entry = MODELS.get(model)
        return model if entry is not None and not entry.uses_backbone else f"{model} ({config['backbone']['name']})"
    if config.get("ensemble"):
        return "patchcore ensemble (" + " + ".join(member["name"] for member in config["ensemble"]) + ")"
    return f"{config.get('method', 'patchcore')} ({config.get('backbone', {}).get('name', '?')})"


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no summary.json; not a finished run folder of jobs.benchmark or jobs.train")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None


def comparison_rows(summaries: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per shared category, every run's metrics as ``<label>: <metric>``; a last mean row."""
    per_run = [{(entry["dataset"], entry["category"]): entry["metrics"] for entry in summary["categories"]}
               for summary in summaries]
    shared = [key for key in per_run[0] if all(key in run for run in per_run[1:])]
    if not shared:
        raise ConfigError("the runs share no category to compare")
    rows = []
    for dataset, category in shared:
        row: dict[str, Any] = {"dataset": dataset, "category": category}
        for label, run in zip(labels, per_run):
            row.update({f"{label}: {name}": run[(dataset, category)].get(name) for name in COMPARED})
        rows.append(row)
    mean: dict[str, Any] = {"dataset": "mean", "category": f"{len(shared)} categories"}
    for column in rows[0]:
        if ": " in column:
            values = [row[column] for row in rows if row[column] is not None]
            mean[column] = float(np.mean(values)) if values else None
    return rows + [mean]


def compare(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two run folders")
    summaries = [read_summary(run_dir) for run_dir in run_dirs]
    labels = [f"{Path(run_dir).name} [{method_of(summary)}]" for run_dir, summary in zip(run_dirs, summaries)]
    rows = comparison_rows(summaries, labels)
    out = Path(out or run_dirs[0])
    write_csv(out / "comparison.csv", rows)
    lines = ["# Runs side by side", ""]
    lines += [f"- **{label}**: `{Path(run_dir).resolve()}`" for label, run_dir in zip(labels, run_dirs)]
    for name in COMPARED:
        columns = [f"{label}: {name}" for label in labels]
        lines += ["", f"## {name}", "", "| dataset | category | " + " | ".join(labels) + " |",
                  "|---|---|" + "---|" * len(labels)]
        for row in rows:
            cells = ["n/a" if row[column] is None else f"{row[column]:.4f}" for column in columns]
            if row["dataset"] == "mean":
                cells = [f"**{cell}**" for cell in cells]
            lines.append(f"| {row['dataset']} | {row['category']} | " + " | ".join(cells) + " |")
    path = out / "comparison.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (outputs/<run>) to put side by side")
    parser.add_argument("--out", type=Path, help="folder for comparison.md / .csv (default: the first run's)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error as well")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_job(lambda: compare(args.runs, args.out), args.debug)


if __name__ == "__main__":
    sys.exit(main())
