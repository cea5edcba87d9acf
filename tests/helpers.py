"""Test helpers: run the CLI in a subprocess, and simulate the Hugging Face Hub offline."""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def run_cli(*args, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    """`diff-transformer ARGS` in a fresh process, offline; arguments may be paths or numbers."""
    return subprocess.run(
        [sys.executable, "-m", "modeling_diff_cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})),
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str):
    """Exit status 2, exactly one `error:` line containing `pattern`, and no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def add_to_hub_cache(cache_dir: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """Copy `folder` as the `main` snapshot of model repo `repo_id` under `cache_dir`; returns the snapshot path."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
