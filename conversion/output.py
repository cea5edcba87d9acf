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


def check_not_a_source(output: str | Path, sources: dict[str, str | Path | None]):
    """Refuse an output folder that is an input, contains one, or lies inside one (real paths: symlinks resolved).

    Writing or replacing such a folder could delete or change the input. `sources` maps how the command names each
    input to its path; names that are not paths (Hub ids) are skipped.
    """
    final = Path(output).expanduser().resolve()
    for name, source in sources.items():
        if source is None or not Path(source).expanduser().exists():
            continue
        real = Path(source).expanduser().resolve()
        if final == real:
            relation = "is"
        elif real.is_relative_to(final):
            relation = "contains"
        elif final.is_relative_to(real):
            relation = "is inside"
        else:
            continue
        raise ConversionError(
            f"the output {output} {relation} the input {source} ({name}): writing it could delete or change the "
            "input; choose an output folder apart from the inputs"
        )


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
