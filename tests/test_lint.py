"""Hugging Face's model linter (transformers-mlinter) finds nothing in modeling_diff/."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mlinter") is None, reason="transformers-mlinter is not installed")
def test_mlinter_is_clean():
    result = subprocess.run(
        ["mlinter", "--no-progress", "--no-cache", "modeling_diff"], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TRF" not in result.stdout, result.stdout
