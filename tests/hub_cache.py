"""Simulate the Hugging Face Hub offline: put a model folder into an HF cache in the snapshot layout."""

import shutil
from pathlib import Path


def add_to_hub_cache(cache_dir: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """Copy `folder` as the `main` snapshot of model repo `repo_id` under `cache_dir`; returns the snapshot path."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
