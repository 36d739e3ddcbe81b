"""python -m jobs.workspace: the workspace it writes offline (read back), and its errors."""

from __future__ import annotations

import json
import sys

import pytest

from jobs.workspace import INSTALL_HINT, main


def test_without_the_library_it_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # import raises ImportError
    assert main(["--project", "p", "--out", str(tmp_path / "ws.json")]) == 2
    assert INSTALL_HINT in capsys.readouterr().err
    assert not (tmp_path / "ws.json").exists()


def _panels(spec: dict) -> dict[str, list[dict]]:
    return {section["name"]: section["panels"] for section in spec["section"]["panelBankConfig"]["sections"]}


def test_written_workspace_groups_by_method_and_shows_the_logged_keys(tmp_path, capsys):
    pytest.importorskip("wandb_workspaces")
    from jobs.workspace import read_workspace

    path = tmp_path / "ws.json"
    assert main(["--project", "anomaly-test", "--entity", "team", "--out", str(path)]) == 0
    assert f"--apply {path}" in capsys.readouterr().out
    view = json.loads(path.read_text())
    assert (view["entity"], view["project"], view["displayName"]) == ("team", "anomaly-test", "Anomaly benchmarks")
    [runset] = view["spec"]["section"]["runSets"]
    assert runset["grouping"] == [{"section": "config", "name": "method.value"}]
    panels = _panels(view["spec"])
    assert list(panels) == ["Methods x categories", "Heat maps", "Time and cost per run", "System metrics per process"]
    quality = panels["Methods x categories"]
    assert quality[0]["viewType"] == "Weave" and '"results"' in json.dumps(quality[0])  # every run's results table
    bars = {tuple(panel["config"]["metrics"]) for panel in quality if panel["viewType"] == "Bar Chart"}
    assert bars == {("mean/image_auroc",), ("mean/pixel_auroc",), ("mean/aupro",)}
    lines = [panel["config"] for panel in quality if panel["viewType"] == "Run History Line Plot"]
    assert {(c["xAxis"], *c["metrics"]) for c in lines} == {("category_index", "category/image_auroc"),
                                                           ("category_index", "category/aupro")}
    [media] = panels["Heat maps"]
    assert media["viewType"] == "Media Browser" and media["config"]["mediaKeys"] == ["examples"]
    assert [panel["config"]["metrics"] for panel in panels["Time and cost per run"]] == [["run/time_s"], ["run/gpu_s"]]
    assert all(panel["config"]["groupBy"] == "method.value" for panel in [*quality[1:], *panels["Time and cost per run"]])
    system = [panel["config"] for panel in panels["System metrics per process"]]
    assert {(c["xAxis"], c["metricRegex"]) for c in system} == {
        ("system/time_s", f"system/.*/{name}") for name in ("cpu_percent", "rss_mib", "gpu_percent", "gpu_memory_mib")}

    # What --apply reads back: the same workspace, for another project where asked
    workspace = read_workspace(path, project="other")
    assert (workspace.entity, workspace.project) == ("team", "other")
    assert [section.name for section in workspace.sections] == list(panels)
    assert [type(panel).__name__ for panel in workspace.sections[2].panels] == ["BarPlot", "BarPlot"]


def test_bad_arguments_and_files_are_one_line_errors(tmp_path, capsys):
    pytest.importorskip("wandb_workspaces")
    assert main(["--out", str(tmp_path / "ws.json")]) == 2
    assert "--project is required" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"entity": "e"}')
    assert main(["--apply", str(bad)]) == 2
    assert f"{bad}: not a workspace file" in capsys.readouterr().err
