"""A ready W&B workspace for a project's benchmark runs, built with W&B's own ``wandb-workspaces`` library.

    python -m jobs.workspace --project P [--entity E] [--name N]      # create it in W&B (online)
    python -m jobs.workspace --project P [--entity E] --out FILE      # write it out; no network
    python -m jobs.workspace --apply FILE [--entity E] [--project P]  # create a written one in W&B

What it shows (the keys ``jobs.tracking`` logs): runs grouped by method (the ``method`` config value);
methods x categories (every run's ``results`` table, one row per category with its method, backbone
and metrics, merged across runs; the mean AUROC / AUPRO per run; each run's metrics over its
categories); the heat-map overlays (``examples``, a slider over the categories); time and GPU-seconds
per run; each process's (actors, training processes) CPU, memory and GPU against time. A written file
is the workspace's view spec as W&B stores it, so applying it later needs no other input. ``wandb-workspaces`` is an
optional extra: ``pip install 'anomaly-bench[workspace]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from anomaly_core.config import ConfigError
from jobs.errors import run_job

INSTALL_HINT = "pip install 'anomaly-bench[workspace]' (or: pip install wandb-workspaces)"
QUALITY = ("image_auroc", "pixel_auroc", "aupro")


def _library() -> tuple[Any, Any]:
    """``wandb_workspaces``' workspace and report modules, or a clear error naming the extra."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as error:
        raise ConfigError(f"jobs.workspace needs the wandb-workspaces library ({error}); {INSTALL_HINT}") from error
    return ws, wr


def build_workspace(project: str, entity: str = "", name: str = "Anomaly benchmarks") -> Any:
    """The workspace (not saved): one section per question a user comes with."""
    ws, wr = _library()
    method = wr.Config("method")
    quality = [
        wr.WeavePanelSummaryTable(table_name="results", layout=wr.Layout(w=24, h=12)),  # methods x categories
        *(wr.BarPlot(title=f"mean {name} per run", metrics=[f"mean/{name}"], groupby=method) for name in QUALITY),
        *(wr.LinePlot(title=f"{name} per category", x="category_index", y=[f"category/{name}"], groupby=method)
          for name in ("image_auroc", "aupro")),
    ]
    cost = [wr.BarPlot(title="run time (s)", metrics=["run/time_s"], groupby=method),
            wr.BarPlot(title="GPU-seconds", metrics=["run/gpu_s"], groupby=method)]
    system = [wr.LinePlot(title=f"processes: {title}", x="system/time_s", metric_regex=f"system/.*/{name}")
              for name, title in (("cpu_percent", "CPU % (100 = one core)"), ("rss_mib", "resident memory (MiB)"),
                                  ("gpu_percent", "GPU utilisation %"), ("gpu_memory_mib", "GPU memory (MiB)"))]
    return ws.Workspace(
        entity=entity, project=project, name=name,
        sections=[
            ws.Section(name="Methods x categories", panels=quality, is_open=True),
            ws.Section(name="Heat maps", panels=[wr.MediaBrowser(title="worst and best test images per category",
                                                                 media_keys=["examples"], layout=wr.Layout(w=24, h=12))],
                       is_open=True),
            ws.Section(name="Time and cost per run", panels=cost, is_open=True),
            ws.Section(name="System metrics per process", panels=system),
        ],
        runset_settings=ws.RunsetSettings(groupby=[ws.Config("method")]),
    )


def write_workspace(workspace: Any, path: Path) -> None:
    """The workspace's view spec as JSON (what ``apply_workspace`` reads back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(workspace._model.model_dump_json(by_alias=True, exclude_none=True, indent=1))


def read_workspace(path: Path, entity: str | None = None, project: str | None = None) -> Any:
    """A written workspace, for ``entity``/``project`` where given instead of the recorded ones."""
    ws, _ = _library()
    from wandb_workspaces.workspaces import internal

    path = Path(path)
    try:
        view = internal.View.model_validate_json(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a workspace file written by jobs.workspace --out ({error})") from error
    workspace = ws.Workspace._from_model(view)
    workspace.entity = entity or workspace.entity
    workspace.project = project or workspace.project
    return workspace


def save_workspace(workspace: Any) -> str:
    """Create the workspace in W&B (the entity defaults to the logged-in user's); returns its URL."""
    if not workspace.entity:
        import wandb

        workspace.entity = wandb.Api().default_entity
    return workspace.save().url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.workspace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", help="the W&B project of the runs (required unless --apply)")
    parser.add_argument("--entity", default="", help="W&B entity (user or team); default: yours")
    parser.add_argument("--name", default="Anomaly benchmarks", help="the workspace's name")
    parser.add_argument("--out", type=Path, help="write the workspace to this JSON file instead of creating it")
    parser.add_argument("--apply", type=Path, metavar="FILE", help="create a workspace written with --out")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.apply is not None:
            print(save_workspace(read_workspace(args.apply, args.entity, args.project)))
            return
        if not args.project:
            raise ConfigError("--project is required (or --apply FILE)")
        workspace = build_workspace(args.project, args.entity, args.name)
        if args.out is not None:
            write_workspace(workspace, args.out)
            print(f"workspace written to {args.out}; create it with: python -m jobs.workspace --apply {args.out}")
        else:
            print(save_workspace(workspace))

    return run_job(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
