"""The README's Jobs API block, run verbatim: `ray start --head`, `ray job submit --working-dir . ...`, `ray stop`.

Token authentication is on: the block makes ~/.ray/auth_token (which turns it on for the head) and
the CLI sends it when RAY_AUTH_MODE=token. Everything binds 127.0.0.1. HOME is a temporary folder, so the token, the
job's durable outputs (~/anomaly-bench/outputs) and W&B's files are all this test's own. The head's
environment holds a fake W&B key (with WANDB_MODE=offline, as a cluster node without network would):
it must never reach a job log, an output or W&B's files; nor may Ray's token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

BIN = Path(sys.executable).parent
FAKE_WANDB_KEY = "fakekey" + "0123456789abcdef" * 2


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block after ``heading`` in the README."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(heading):]
    start = after.index("```bash\n") + len("```bash\n")
    return [line for line in after[start:after.index("```", start)].splitlines() if line.strip()]


def run_line(line: str, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-c", line], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{line}\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout + done.stderr


def test_readme_jobs_api_block_runs_verbatim(tmp_path):
    *lines, stop = readme_block("Local cluster for trying the Jobs API")
    assert stop == "ray stop" and len(lines) == 3
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "WANDB_"))}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", WANDB_API_KEY=FAKE_WANDB_KEY,
               WANDB_MODE="offline")
    try:
        submitted = [run_line(line, env) for line in lines][-1]
        # Token auth is on: the same CLI call without RAY_AUTH_MODE=token gets nothing.
        listing = ["ray", "job", "list", "--address", "http://127.0.0.1:8265"]
        refused = subprocess.run(listing, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert subprocess.run(listing, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, timeout=120).returncode == 0
        run_line(stop, env)
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert "succeeded" in submitted and "tire_small  tire" in submitted  # the table, streamed back from the job
    (run_dir,) = (home / "anomaly-bench" / "outputs").glob("demo-*")  # durable, not in Ray's temporary copy
    assert f"-> {run_dir}" in submitted  # the job's last line names the absolute folder
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [entry["category"] for entry in summary["categories"]] == ["tire"]
    assert summary["categories"][0]["metrics"]["image_auroc"] > 0.8  # demo settings: 0.875 measured
    assert any(key == "node:127.0.0.1" for key in summary["cluster"]["resources"])
    # Security: nothing secret in the job's log or in any file it wrote (W&B's offline run included).
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 16
    written = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any("wandb" in path.parts for path in written)
    for secret in (FAKE_WANDB_KEY, token):
        assert secret not in submitted
        assert not [path for path in written if secret.encode() in path.read_bytes()]
