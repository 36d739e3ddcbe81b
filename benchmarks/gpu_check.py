"""The stages of the GPU check (benchmarks/gpu_check.sh runs this after installing what the image lacks).

    python benchmarks/gpu_check.py prepare [--scale F]                # the shaped data sets, nothing else
    python benchmarks/gpu_check.py run [--device cuda|cpu] [--scale F] [--budget S] [--set KEY=VALUE ...]

``run`` goes through, within ``--budget`` seconds counted from $GPU_CHECK_T0 (the shell script's start),
in order of what each tells: the engine's stages (benchmarks/device_check.py: extraction against the
backbone's pure-forward limit, coreset, search, metrics; no Ray); the tire-shaped category through the
cluster job (benchmarks/end_to_end.py) with the CPU-equal check; the MVTec-AD-shaped benchmark
(benchmarks/shaped_category.py) through ``jobs.benchmark`` with EfficientNet-Lite0 (package weights) and
with wide_resnet50_2 (random weights); the demo. Each stage is a child process in its own process group
(killed whole when the time is up) with its own log, while nvidia-smi samples the GPU every 0.5 s. A stage
cut by the budget still reports the categories it finished (their metrics.json). Printed, and written to
``<out>/gpu_check.json`` with the stage logs in ``<out>/stage_logs.tar.gz``; exit status 1 if a stage
failed or a metric is off.

``--device cpu`` runs the same stages on the CPU (GPU settings not applied, no GPU sampling): a dry run,
whose times mean nothing on a shared machine. Below ``--scale 1`` the data shrink (tire: the 34 / 28
real images, checked against the CPU's metrics for that shape; MVTec AD: the scaled counts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from shaped_category import make_mvtec_shaped, make_shaped_category  # noqa: E402

# The tire-shaped category's metrics on the 2-core CPU, demo settings (docs/BENCHMARKS.md: "End to end" at
# 239 / 112 images, "Scoring" at the 34 / 28 real ones): a run of the same settings elsewhere must land
# within TOLERANCE of each.
TIRE_FULL, TIRE_REAL = (239, 112), (34, 28)
CPU_METRICS = {TIRE_FULL: {"image_auroc": 0.9008, "pixel_auroc": 0.9865, "aupro": 0.9482},
               TIRE_REAL: {"image_auroc": 0.9000, "pixel_auroc": 0.9764, "aupro": 0.9103}}
METRICS = ("image_auroc", "pixel_auroc", "aupro")
TOLERANCE = 0.005
# One GPU, 16 cores: half a GPU per extractor (colocated: each holds and scores its own features), bigger
# batches, more threads than the CPU configs', and 512 coreset candidates per round (fewer rounds of the lone holder).
GPU_SET = ["cluster.gpus_per_extractor=0.5", "cluster.batch_size=64", "cluster.cpus_per_actor=4",
           "cluster.coreset_batch=512"]
CPU_SET = ["cluster.gpus_per_extractor=0", "cluster.batch_size=8", "cluster.cpus_per_actor=2", "cluster.coreset_shards=2"]
BACKBONES = {
    "lite0": ["backbone.name=tf_efficientnet_lite0", "backbone.layers=[blocks.2, blocks.4]", "backbone.weights=package"],
    "wrn50": ["backbone.name=wide_resnet50_2", "backbone.layers=[layer2, layer3]", "backbone.weights=random"],
}
EXTRACTION_STAGES = ("decode_s", "wait_decode_s", "h2d_s", "forward_s", "embed_s", "d2h_s")
MIN_STAGE_S = 30  # a stage is not started with less time left


def tire_shape(scale: float) -> tuple[int, int]:
    return TIRE_FULL if scale >= 1 else TIRE_REAL


def prepare(work: Path, scale: float, workers: int, only: str | None = None) -> None:
    """The tire-shaped category and the MVTec-AD-shaped set under ``work`` (or ``only`` one); reused when made."""
    if only in (None, "tire"):
        make_shaped_category(REPO / "data" / "tire_small", work / "tire_shaped", "tire", *tire_shape(scale))
    if only in (None, "mvtec"):
        make_mvtec_shaped(REPO / "data" / "tire_small", work / "mvtec_shaped", scale, workers)


class GpuSampler:
    """nvidia-smi's utilisation and memory every 0.5 s while a stage runs; mean and peak at the end."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.process = path, None
        if enabled and shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=path.open("w"), stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, Any]:
        if self.process is None:
            return {"util_mean_pct": "n/a", "util_peak_pct": "n/a", "memory_peak_mib": "n/a"}
        self.process.terminate()
        self.process.wait()
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append([float(cell) for cell in line.split(",")[:2]])
            except ValueError:
                continue
        if not rows:
            return {"util_mean_pct": "n/a", "util_peak_pct": "n/a", "memory_peak_mib": "n/a", "samples": 0}
        util = [row[0] for row in rows]
        return {"util_mean_pct": round(sum(util) / len(util), 1), "util_peak_pct": max(util),
                "memory_peak_mib": max(row[1] for row in rows), "samples": len(rows)}


class Check:
    """The run's state: deadline, environment, logs and the per-stage record."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = float(os.environ.get("GPU_CHECK_T0", time.time())) + args.budget
        self.logs = args.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "WANDB_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)  # every job starts its own embedded Ray
        self.stages: dict[str, dict[str, Any]] = {}
        self.failed: list[str] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def stage(self, name: str, command: list[str], cap: float) -> dict[str, Any]:
        """Run ``command`` as stage ``name`` for at most ``cap`` seconds (and never past the deadline)."""
        limit = min(cap, self.left())
        if limit < MIN_STAGE_S:
            record = {"status": f"skipped: {limit:.0f} s left for it"}
            print(f"\n== {name}: {record['status']}", flush=True)
            self.stages[name] = record
            return record
        log = self.logs / f"{name}.log"
        print(f"\n== {name} (at most {limit:.0f} s): {' '.join(command)}", flush=True)
        sampler = GpuSampler(self.logs / f"{name}.gpu.csv", self.args.device.startswith("cuda"))
        started = time.perf_counter()
        with log.open("w") as out:
            process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # its own group: a timeout ends Ray's processes too
            try:
                code = process.wait(timeout=limit)
                status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                stop_group(process)
                status = f"cut at {limit:.0f} s"
        record = {"status": status, "wall_s": round(time.perf_counter() - started, 1), "gpu": sampler.stop()}
        gpu = record["gpu"]
        print(f"   {status} in {record['wall_s']} s; GPU utilisation mean {_unit(gpu['util_mean_pct'], '%')}, peak "
              f"{_unit(gpu['util_peak_pct'], '%')}, GPU memory peak {_unit(gpu['memory_peak_mib'], 'MiB')}", flush=True)
        if status.startswith("failed"):
            self.failed.append(name)
            print("   last lines of its log:\n" + "\n".join("   | " + line for line in log.read_text().splitlines()[-60:]))
        self.stages[name] = record
        return record

    def benchmark(self, name: str, config: str, overrides: list[str], cap: float, categories: str | None = None) -> None:
        """``jobs.benchmark`` as stage ``name``; its summary.json (or, when cut, its finished categories) read."""
        outputs = self.args.work / "outputs"
        shutil.rmtree(outputs / name, ignore_errors=True)  # a rerun on a warm machine: runs never reuse a folder
        command = [sys.executable, "-m", "jobs.benchmark", "--config", config, "--wandb", "off", "--run-name", name,
                   *[arg for item in [f"output_dir={outputs}", *overrides, *self.device_set()] for arg in ("--set", item)],
                   *(["--categories", categories] if categories else [])]
        record = self.stage(name, command, cap)
        if "wall_s" in record:
            record.update(read_run(outputs / name))
            print_run(record)

    def prepare_command(self, only: str) -> list[str]:
        return [sys.executable, "benchmarks/gpu_check.py", "prepare", "--only", only, "--work", str(self.args.work),
                "--scale", str(self.args.scale), "--workers", str(self.args.workers)]

    def device_set(self) -> list[str]:
        return (GPU_SET if self.args.device.startswith("cuda") else CPU_SET) + self.args.overrides


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to every process of the stage's session, then SIGKILL to what is left of it 15 s later.

    The session, not the process group: Ray's workers put themselves in groups of their own, and one left
    running would hold its GPU memory into the next stage."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(process.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass


def session_members(sid: int) -> list[int]:
    """The processes of session ``sid`` (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    members.append(int(entry))
            except OSError:  # gone meanwhile
                continue
    return members


def read_run(run_dir: Path) -> dict[str, Any]:
    """What a jobs.benchmark run folder tells: from summary.json, or from the finished categories' metrics.json."""
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        cluster = summary.get("cluster", {})
        return {
            "total_s": summary["timings"]["total_s"], "images_per_s": summary["timings"]["images_per_s"],
            "categories": [{"name": entry["category"], "n_train": entry["n_train"], "n_test": entry["n_test"],
                            "timings": entry["timings"], "metrics": entry["metrics"]} for entry in summary["categories"]],
            "mean_metrics": summary["mean"]["metrics"],
            "extractors": [{key: actor.get(key, "n/a") for key in
                            ("images", "busy_s", "images_per_s", "stages", "decode_workers", "decode_images_per_s")}
                           for actor in cluster.get("extractors", [])],
            "evaluators": [{key: actor.get(key) for key in ("images", "busy_s")} for actor in cluster.get("evaluators", [])],
            "object_store": cluster.get("object_store", "n/a"),
        }
    finished = sorted(run_dir.glob("*/*/metrics.json"))
    return {"categories": [{"name": path.parent.name, "timings": (data := json.loads(path.read_text()))["timings"],
                            "metrics": data["values"]} for path in finished],
            "note": f"no summary.json: {len(finished)} categories finished before the stage ended"}


def _num(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _unit(value: Any, unit: str) -> str:
    return f"{value} {unit}" if isinstance(value, (int, float)) else "n/a"


def _mib(value: Any) -> str:
    return f"{value / 2**20:.0f} MiB" if isinstance(value, (int, float)) else "n/a"


def print_run(record: dict[str, Any]) -> None:
    """Per-category and total time, extraction stages, coreset and evaluation times, object-store bytes."""
    if "note" in record:
        print(f"   {record['note']}")
    else:
        print(f"   total {_num(record['total_s'])} s, {_num(record['images_per_s'])} images/s; mean "
              + ", ".join(f"{name}={_num(record['mean_metrics'].get(name), 4)}" for name in METRICS))
    print(f"   {'category':<12} {'train':>5} {'test':>5} {'extract_train_s':>15} {'coreset_s':>9} {'evaluate_s':>10} "
          f"{'metrics_s':>9} {'total_s':>8}  image/pixel AUROC, AUPRO")
    for entry in record["categories"]:
        t = entry["timings"]
        total = sum(t.get(key, 0.0) for key in ("extract_train_s", "coreset_s", "evaluate_s"))
        m = entry["metrics"]
        print(f"   {entry['name']:<12} {entry.get('n_train', ''):>5} {entry.get('n_test', ''):>5} "
              f"{_num(t.get('extract_train_s')):>15} {_num(t.get('coreset_s')):>9} {_num(t.get('evaluate_s')):>10} "
              f"{_num(t.get('metrics_s')):>9} {_num(total):>8}  "
              + " / ".join(_num(m.get(key), 4) for key in METRICS))
    for i, actor in enumerate(record.get("extractors", [])):
        stages = actor["stages"]
        stage_text = (", ".join(f"{key} {_num(stages.get(key), 2)}" for key in EXTRACTION_STAGES)
                      if isinstance(stages, dict) else "stages n/a")
        print(f"   extractor {i}: {actor['images']} images, busy {_num(actor['busy_s'])} s, {_num(actor['images_per_s'])} "
              f"images/s; {stage_text}; decode workers {actor['decode_workers']}, decode "
              f"{_num(actor['decode_images_per_s'])} images/s")
    for i, actor in enumerate(record.get("evaluators", [])):
        print(f"   evaluator {i}: {actor['images']} images, busy {_num(actor['busy_s'])} s")
    store = record.get("object_store", "n/a")
    if isinstance(store, dict) and "error" not in store:
        print(f"   object store: peak {_mib(store['peak_used_bytes'])} (sampled every {store['sample_every_s']} s), "
              f"{_mib(store['used_bytes_end'])} at the end, {_mib(store['created_bytes'])} put through, "
              f"{_mib(store['spilled_bytes'])} spilled, disk fallback peak {_mib(store['peak_fallback_bytes'])}, "
              f"capacity {_mib(store['capacity_bytes'])}")
    elif "note" not in record:
        print(f"   object store: n/a ({store})")


def compare(metrics: dict[str, Any], expected: dict[str, float], label: str) -> dict[str, Any]:
    """The CPU-equal check of one run's tire metrics."""
    off = [name for name, value in expected.items()
           if not isinstance(metrics.get(name), (int, float)) or abs(metrics[name] - value) > TOLERANCE]
    verdict = "FAIL" if off else "PASS"
    print(f"   CPU-equal check ({label}, within {TOLERANCE}): {verdict}: " + ", ".join(
        f"{name} {_num(metrics.get(name), 4)} vs {value:.4f}" for name, value in expected.items()))
    return {"verdict": verdict, "metrics": {name: metrics.get(name) for name in expected}, "expected": expected,
            "tolerance": TOLERANCE}


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                            "platform": platform.platform()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


def run(args: argparse.Namespace) -> int:
    check = Check(args)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine(args.device)
    print(f"GPU check on {args.device}: {info}; budget {args.budget:.0f} s, {check.left():.0f} s left", flush=True)
    results: dict[str, Any] = {"device": args.device, "machine": info, "scale": args.scale, "budget_s": args.budget,
                               "stages": check.stages, "cpu_equal": {}}
    check.stage("tire_data", check.prepare_command("tire"), cap=120)  # reused if stage 1 made it
    tire_root = args.work / "tire_shaped"
    n_train, n_test = tire_shape(args.scale)

    engine_json = args.work / "device.json"
    engine_json.unlink(missing_ok=True)
    record = check.stage("engine", [sys.executable, "benchmarks/device_check.py", "--device", args.device,
                                    "--batch-size", "64", "--work", str(tire_root), "--n-train", str(n_train),
                                    "--n-test", str(n_test), "--json", str(engine_json)],
                         cap=240)  # with the exact-math check: numpy references on the CPU, two precisions
    if engine_json.is_file():
        engine = json.loads(engine_json.read_text())
        record["result"] = engine
        print(f"   extraction {_num(engine['extract']['images_per_s'])} images/s (decode included) against a pure "
              f"forward limit of {_num(engine['pure_forward_images_per_s'])} images/s; coreset "
              f"{_num(engine['coreset']['seconds'])} s; scoring {_num(engine['scoring']['seconds'])} s; total "
              f"{_num(engine['total_s'])} s")
        for precision, row in engine.get("exact_math", {}).items():
            if precision in ("bf16", "fp32"):
                print(f"   exact math {precision}: kNN {_num(row['knn_images_per_s'])} images/s, coreset "
                      f"{_num(row['coreset_s'])} s, error/bound {row['max_error_over_bound']:.3f}, unproven "
                      f"{100 * row['unproven_fraction']:.3f} %, equal to numpy: picks "
                      f"{row['coreset_picks_equal_numpy']}, kNN {row['knn_equal_numpy']}")
        results["cpu_equal"]["engine"] = compare(engine["metrics"], CPU_METRICS[(n_train, n_test)], "engine, no Ray")

    cuda = args.device.startswith("cuda")
    # Every trained model's training and inference images/s with its example config's backbone (the authors':
    # WRN50, ResNet18, DINOv2 ViT-B, PDN-S) at random init, then EfficientAD's M teacher.
    check.stage("train_speed", [sys.executable, "benchmarks/train_speed.py", "--device", args.device, "--epochs",
                                "10" if cuda else "1", "--json", str(args.work / "train_speed.json")],
                cap=150 if cuda else 900)
    check.stage("train_speed_efficient_ad_pdn_medium", [
        sys.executable, "benchmarks/train_speed.py", "--device", args.device, "--models", "efficient_ad",
        "--backbone", "pdn_medium", "--epochs", "3" if cuda else "1",
        "--json", str(args.work / "train_speed_efficient_ad_pdn_medium.json")], cap=150 if cuda else 600)

    if info["ray"] is None:
        print("\nRay is not installed here (part 1 of the wheels was not on this machine): cluster stages skipped")
        for name in ("tire", "mvtec_lite0", "mvtec_wrn50", "demo", "train_job"):
            check.stages[name] = {"status": "skipped: no Ray"}
    else:
        e2e_json = args.work / "e2e.json"
        e2e_json.unlink(missing_ok=True)
        record = check.stage("tire", [sys.executable, "benchmarks/end_to_end.py", "--skip-anomalib", "--root",
                                      str(tire_root), "--category", "tire", "--work", str(args.work / "e2e"),
                                      "--json", str(e2e_json), "--set", *check.device_set()], cap=180)
        if "wall_s" in record:
            record.update(read_run(args.work / "e2e" / "outputs" / "ours"))
            print_run(record)
            if record["categories"]:
                results["cpu_equal"]["tire"] = compare(record["categories"][0]["metrics"], CPU_METRICS[(n_train, n_test)],
                                                       "tire through jobs.benchmark")

        check.stage("mvtec_data", check.prepare_command("mvtec"), cap=240)  # reused if stage 1 made it
        mvtec = [f"datasets.0.root={args.work / 'mvtec_shaped'}"]
        wrn50_categories = args.wrn50_categories or (None if args.device.startswith("cuda") else "toothbrush")
        # Lite0 may use the time left but a minute, for WRN50 to start; WRN50 takes what remains.
        check.benchmark("mvtec_lite0", "configs/mvtec_ad.yaml", mvtec + BACKBONES["lite0"],
                        cap=max(check.left() - 60, MIN_STAGE_S))
        check.benchmark("mvtec_wrn50", "configs/mvtec_ad.yaml", mvtec + BACKBONES["wrn50"], cap=check.left(),
                        categories=wrn50_categories)
        check.benchmark("demo", "configs/demo.yaml", [], cap=150)
        # jobs.train as configs/reverse_distillation.yaml ships (1 GPU, 4 CPUs a category) on tire, 5 epochs.
        on_cpu = [] if cuda else ["training.gpus_per_worker=0", "training.cpus_per_worker=1", "training.epochs=1"]
        sets = ["datasets=[{name: tire_small, format: mvtec, root: data/tire_small}]", "backbone.name=tf_efficientnet_lite0",
                "backbone.layers=[]", "backbone.weights=package", "training.epochs=5", f"output_dir={args.work / 'outputs'}",
                *on_cpu]
        shutil.rmtree(args.work / "outputs" / "train_job", ignore_errors=True)
        check.stage("train_job", [sys.executable, "-m", "jobs.train", "--config", "configs/reverse_distillation.yaml",
                                  "--wandb", "off", "--run-name", "train_job",
                                  *[arg for item in sets for arg in ("--set", item)]], cap=180)

    failed_checks = [name for name, verdict in results["cpu_equal"].items() if verdict["verdict"] != "PASS"]
    results["failed_stages"], results["failed_checks"] = check.failed, failed_checks
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    with tarfile.open(args.out / "stage_logs.tar.gz", "w:gz") as bundle:
        bundle.add(check.logs, arcname="logs")
    print("\nstages: " + ", ".join(f"{name} {stage['status']}" for name, stage in check.stages.items()))
    print("CPU-equal checks: " + (", ".join(f"{n} {v['verdict']}" for n, v in results["cpu_equal"].items())
                                   or "none ran"))
    print(f"written: {args.out / 'gpu_check.json'}, {args.out / 'stage_logs.tar.gz'}")
    return 1 if check.failed or failed_checks else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("prepare", "run"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the data sets' counts (dry runs)")
    parser.add_argument("--budget", type=float, default=500.0, help="seconds for everything, from $GPU_CHECK_T0")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-check-work"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-check")))
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes writing the data sets")
    parser.add_argument("--only", choices=("tire", "mvtec"), help="prepare: one data set only")
    parser.add_argument("--wrn50-categories", help="comma-separated (default: all on CUDA, toothbrush on the CPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="appended to every jobs.benchmark run's settings")
    args = parser.parse_args(argv)
    if args.mode == "prepare":
        started = time.perf_counter()
        prepare(args.work, args.scale, args.workers, args.only)
        print(f"data ready under {args.work} in {time.perf_counter() - started:.1f} s")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
