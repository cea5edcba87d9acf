"""Atomic output folders: everything is written to a temporary sibling that is renamed only on success."""

import contextlib
import shutil
import tempfile
from pathlib import Path

from .source import ConversionError


def check_output_dir(path: str | Path, force: bool, flag: str = "--force"):
    """Refuse an existing, non-empty output folder unless `force` (the option `flag` of the command that writes it)."""
    final = Path(path).expanduser()
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not force:
        raise ConversionError(f"{path} exists and is not empty; pass {flag} to replace it")


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, force: bool = False, flag: str = "--force"):
    """Yield a temporary sibling folder that becomes `path` only if the block finishes without an error.

    An interrupted or failed block leaves nothing behind: neither `path` nor the temporary folder.
    """
    check_output_dir(path, force, flag)
    final = Path(path).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
