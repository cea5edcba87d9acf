"""What a command may write, and how: nothing the user owns is deleted, overwritten or mixed with this tool's files.

- `check_apart(output, inputs)`: an output must not be, hold or lie inside an input. Files are compared by identity
  (device and inode), so a symlink, a hard link or a bind mount of an input is that input.
- `check_output_dir(path, force)`: an existing output may be replaced (`force`) only when this tool wrote it: it
  carries the marker file `MARKER`, which lists every file the tool wrote there, and holds nothing else. The working
  directory, the home directory, a mount point, a symlink and a file are never replaced. Everything the replacement
  would delete must be deletable, checked before any work.
- `output_lock(path)`: one run per output at a time, through a lock file beside it that the kernel releases when its
  process ends (a crashed run leaves no stale lock).
- `atomic_output_dir(path)`: everything is written to a temporary sibling folder, which is swapped in only when the
  block succeeds; the old output is deleted last. On any failure the old output is intact.
- `write_text_output(path, text)`: a one-file output (`eval --json`), replaced atomically, only when this tool wrote
  the file it replaces.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path

from transformers.utils import logging

from .source import ConversionError

logger = logging.get_logger(__name__)

MARKER = ".diff-transformer.json"  # hidden: `push` never uploads it
HASHED_BYTES = 64 * 2**20  # files up to this size are recorded by sha256 (configs, tokenizers, cards); weights by size
SCANNED_ENTRIES = 10_000  # how many entries of an input folder are compared with an output, at most
# Linux's FS_IOC_GETFLAGS (_IOR('f', 1, long)) and the flags that make a file undeletable, even by root
FS_IOC_GETFLAGS, FS_IMMUTABLE_FL, FS_APPEND_FL = 0x80086601, 0x10, 0x20
BSD_UNDELETABLE = getattr(stat, "UF_IMMUTABLE", 0) | getattr(stat, "SF_IMMUTABLE", 0) | getattr(stat, "UF_APPEND", 0)


# ------------------------------------------------------------------------------------------------ outputs vs inputs


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what `path` names (symlinks followed), or None when nothing is there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _real_chain(path: Path) -> dict[tuple[int, int], Path]:
    """{identity: folder} of `path` (or, when it does not exist, its nearest existing ancestor) and every folder
    above it, by real path: a bind mount shows the identity of the folder it mounts."""
    real = Path(os.path.realpath(path))
    return {ident: p for p in (real, *real.parents) if (ident := _identity(p)) is not None}


def _entries(folder: Path, limit: int = SCANNED_ENTRIES):
    """The entries under `folder` (os.walk order, symlinks not descended), at most `limit` of them."""
    count = 0
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            yield Path(root) / name
            count += 1
            if count >= limit:
                return


def check_apart(output: str | Path, inputs: dict[str, str | Path | None], what: str = "output"):
    """Refuse an output that is an input, holds one or lies inside one.

    Compared by file identity (st_dev, st_ino), not by name: a symlink, a hard link or a bind mount of an input is
    that input, and an output that holds a file an input links to (its real location) holds that input. `inputs` maps
    how the command names each input to its path; names that are not paths (Hub ids) and None are skipped. Writing
    or replacing such an output could delete or change the input.
    """
    out = Path(output).expanduser()
    out_id = _identity(out)
    out_chain = _real_chain(out)  # the output and the folders above it
    for name, source in inputs.items():
        if source is None:
            continue
        src = Path(source).expanduser()
        src_id = _identity(src)
        if src_id is None:
            continue
        relation = None
        if src_id == out_id:
            relation = "is"
        elif src_id in out_chain:
            relation = "is inside"
        elif out_id is not None and out_id in _real_chain(src):
            relation = "contains"
        elif out_id is not None and src.is_dir():
            for entry in _entries(src):
                if out.is_dir() and entry.is_symlink() and out_id in _real_chain(entry):
                    relation = f"holds {os.path.realpath(entry)} (what {entry} links to), a file of"
                    break
                if not out.is_dir() and _identity(entry) == out_id:
                    relation = f"is {entry}, a file of"
                    break
        if relation:
            raise ConversionError(
                f"the {what} {output} {relation} the input {source} ({name}): writing it could delete or change the "
                f"input; choose another {what}, apart from the inputs"
            )


# ---------------------------------------------------------------------------------------- what may be replaced


def _undeletable_flags(path: Path) -> bool:
    """Whether `path` is immutable or append-only (chattr +i / +a, chflags uchg): then not even root deletes it."""
    st = path.lstat()
    if getattr(st, "st_flags", 0) & BSD_UNDELETABLE:
        return True
    if not hasattr(os, "O_NOFOLLOW") or stat.S_ISLNK(st.st_mode) or not (stat.S_ISREG(st.st_mode) or path.is_dir()):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        flags = fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)
        return bool(int.from_bytes(flags[:4], sys.byteorder) & (FS_IMMUTABLE_FL | FS_APPEND_FL))
    except OSError:  # a file system without such flags
        return False
    finally:
        os.close(fd)


def deletion_problem(folder: Path) -> str | None:
    """Why deleting `folder` and everything in it would fail part-way, or None when it would not: a folder that this
    process may not write (its entries cannot be removed), or an immutable or append-only entry."""
    for path in (folder, *_entries(folder, limit=10**9)):
        if _undeletable_flags(path):
            return f"{path} is immutable or append-only (chattr +i / +a)"
        if path.is_dir() and not path.is_symlink() and not os.access(path, os.W_OK | os.X_OK):
            return f"the folder {path} is read-only for this user"
    return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_marker(folder: Path, written_by: str) -> None:
    """Record in `folder` that this tool wrote it, and every file it wrote (size; sha256 up to HASHED_BYTES)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != MARKER:
            size = path.stat().st_size
            files[path.relative_to(folder).as_posix()] = {
                "size": size,
                **({"sha256": _sha256(path)} if size <= HASHED_BYTES else {}),
            }
    record = {"written_by": written_by, "kind": "output", "files": files}
    (folder / MARKER).write_text(json.dumps(record, indent=1) + "\n")


def read_marker(folder: Path) -> dict | None:
    """The marker `folder` carries, or None when it carries none (or one that this tool did not write)."""
    path = folder / MARKER
    if not path.is_file() or path.is_symlink():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    return (
        record
        if isinstance(record, dict) and str(record.get("written_by", "")).startswith("diff-transformer")
        else None
    )


def not_written_here(folder: Path, record: dict) -> list[str]:
    """The entries of `folder` that its marker does not account for: files the tool did not write, files changed
    since, symlinks, and folders that hold none of its files."""
    files = record.get("files") if record.get("kind") == "output" else None
    if not isinstance(files, dict):
        return [f"{MARKER} (it is not an output's marker)"]
    folders = {parent.as_posix() for name in files for parent in Path(name).parents if parent != Path(".")}
    foreign = []
    for path in _entries(folder, limit=10**9):
        rel = path.relative_to(folder).as_posix()
        if rel == MARKER:
            continue
        if path.is_symlink():
            foreign.append(f"{rel} (a symlink)")
        elif path.is_dir():
            if rel not in folders:
                foreign.append(f"{rel}/")
        elif rel not in files or not isinstance(files[rel], dict):
            foreign.append(rel)
        elif path.stat().st_size != files[rel].get("size") or (
            "sha256" in files[rel] and _sha256(path) != files[rel]["sha256"]
        ):
            foreign.append(f"{rel} (changed since)")
    return foreign


def _protected(path: Path) -> str | None:
    """Why `path` is never an output to replace, or None."""
    real = Path(os.path.realpath(path))
    if real == Path(os.path.realpath(Path.home())):
        return "is the home directory"
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd:
        return "is the working directory"
    if cwd.is_relative_to(real):
        return "holds the working directory"
    if _is_mount_point(real):
        return "is a mount point"
    return None


def _is_mount_point(real: Path) -> bool:
    """Whether `real` is a mount point, a bind mount of a folder on the same file system included (which
    os.path.ismount cannot see: it compares devices); Linux lists them all in /proc/self/mountinfo."""
    if os.path.ismount(real):
        return True
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    # the fifth field is the mount point, with spaces and the like escaped as octal (\040)
    points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in lines}
    return str(real) in points


def check_output_dir(path: str | Path, force: bool, flag: str = "--overwrite_output_dir"):
    """Refuse an output that must not be written or replaced; return nothing when it may be.

    Missing or an empty folder: written. A non-empty folder: replaced only with `force` (the option `flag` of the
    command that writes it), and only when this tool wrote it (`MARKER`), it holds nothing else, and all of it can be
    deleted. Never: a symlink, a file, the home or working directory (or a folder holding it), a mount point.
    """
    final = Path(path).expanduser()
    if final.is_symlink():
        raise ConversionError(
            f"{path} is a symlink (to {os.readlink(final)}): an output is written as a folder of its own; name a new "
            "folder, or the link's target itself"
        )
    if not final.exists():
        return
    protected = _protected(final)
    if protected:
        raise ConversionError(f"{path} {protected}: name a new folder for the output (e.g. {final / 'model'})")
    if not final.is_dir():
        raise ConversionError(f"{path} is a file, not an output folder: name a new folder, or move the file away")
    if not any(final.iterdir()):
        return
    if not force:
        raise ConversionError(
            f"{path} exists and is not empty; pass {flag} to replace an earlier output of diff-transformer"
        )
    record = read_marker(final)
    if record is None:
        raise ConversionError(
            f"{path} was not written by diff-transformer (it has no {MARKER}): {flag} replaces only an earlier "
            "output of this tool; move its files away or name a new folder"
        )
    foreign = not_written_here(final, record)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConversionError(
            f"{path} holds what diff-transformer did not write there ({shown}): {flag} replaces only the tool's own "
            "files; move those away or name a new folder"
        )
    problem = deletion_problem(final)
    if problem:
        raise ConversionError(f"{path} cannot be replaced: {problem}; fix that, or name a new folder")


# --------------------------------------------------------------------------------------------------- one run each


def lock_path(output: str | Path) -> Path:
    """The lock file of an output: `.NAME.lock` beside it."""
    final = Path(os.path.abspath(Path(output).expanduser()))
    return final.parent / f".{final.name}.lock"


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; the folders it created, deepest first."""
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists() or parent.is_symlink():
            break
        missing.append(parent)
    for parent in reversed(missing):
        try:
            parent.mkdir()
        except OSError as err:
            _remove_empty(missing[missing.index(parent) + 1 :])
            raise ConversionError(f"cannot create the folder {parent}: {err.strerror or err}")
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def output_lock(output: str | Path):
    """Hold the lock of `output` for the block: a second run on the same output is refused at once, with one line.

    `fcntl.flock` on `.NAME.lock` beside the output: the kernel releases it when the process ends, so a crashed run
    leaves no stale lock (its file stays, unlocked, and the next run takes it). Taking the lock also proves, before
    any work, that the output's folder can be written: the parents it creates are removed again when the block
    fails before the output exists.
    """
    path = lock_path(output)
    created = _make_parents(path.parent)
    try:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise ConversionError(
                    f"cannot write in {path.parent} ({err.strerror or err}): choose an output in a folder you can "
                    "write"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                raise ConversionError(
                    f"another diff-transformer run is writing {output} ({holder or 'lock ' + str(path)}): wait for it "
                    "to end, or choose another output"
                )
            # the lock file may have been removed and made anew meanwhile: hold the one the path names
            if _same_file(fd, path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
    finally:
        _remove_empty(created)


def _same_file(fd: int, path: Path) -> bool:
    st = os.fstat(fd)
    return _identity(path) == (st.st_dev, st.st_ino)


# ----------------------------------------------------------------------------------------------- atomic writes


class InterruptedAfterWriting(KeyboardInterrupt):
    """Ctrl-C that came while the finished output was being swapped in: it is complete, and the message says so."""


@contextlib.contextmanager
def _interruptions_deferred():
    """Hold Ctrl-C back for the block (a few renames), and raise it after: never half a swap."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _free_name(final: Path, suffix: str) -> Path:
    for _ in range(100):
        candidate = final.with_name(f"{final.name}{suffix}-{secrets.token_hex(3)}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise ConversionError(f"cannot find a free name beside {final}")


def swap_into_place(new: Path, final: Path) -> None:
    """Make the folder `new` the output `final`: rename the old output aside, rename `new` in, delete the old one.

    When the old output cannot be deleted in full (checked first), nothing is swapped: `new` is kept beside it under
    a visible name and the error says where. The renames are atomic; Ctrl-C waits until both are done.
    """
    if not final.exists() and not final.is_symlink():
        new.rename(final)
        return
    problem = deletion_problem(final)
    if problem:
        kept = _free_name(final, ".new")
        new.rename(kept)
        raise ConversionError(f"cannot replace {final}: {problem}; it is unchanged, and the new output is at {kept}")
    aside = final.with_name(f".{final.name}.old-{secrets.token_hex(3)}")
    with _interruptions_deferred() as interrupted:
        final.rename(aside)
        try:
            new.rename(final)
        except BaseException:
            aside.rename(final)
            raise
    try:
        shutil.rmtree(aside)
    except OSError as err:
        logger.warning(
            f"{final} was replaced, but the old output could not be deleted in full: what is left is at "
            f"{aside} ({err})"
        )
    if interrupted:
        raise InterruptedAfterWriting(f"{final} was written in full before the interruption")


@contextlib.contextmanager
def atomic_output_dir(
    path: str | Path, force: bool = False, flag: str = "--overwrite_output_dir", written_by: str = "diff-transformer"
):
    """Yield a temporary sibling folder that becomes `path` only if the block finishes without an error.

    The folder gets this tool's marker (`MARKER`, naming `written_by`), so that a later `force` may replace it. An
    existing output is checked (`check_output_dir`) before the block and again before it is replaced; it is deleted
    only after the new one is in place. A failed or interrupted block leaves the old output as it was, and neither
    the temporary folder nor the parent folders it created. Hold `output_lock(path)` around it (the caller's whole
    run) so that no other run writes the same output meanwhile.
    """
    final = Path(os.path.abspath(Path(path).expanduser()))
    check_output_dir(final, force, flag)
    created = _make_parents(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as err:
        _remove_empty(created)
        raise ConversionError(f"cannot write in {final.parent} ({err.strerror or err}): choose another output")
    tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        write_marker(tmp, written_by)
        try:
            check_output_dir(final, force, flag)  # what is there now: the block may have taken hours
        except ConversionError as err:
            kept = _free_name(final, ".new")
            tmp.rename(kept)
            raise ConversionError(f"{err}; it is unchanged, and the new output is at {kept}")
        swap_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            _remove_empty(created)


def check_text_output(path: str | Path, written_by: str, is_mine) -> None:
    """Refuse a one-file output (`eval --json`) that must not be written: a symlink, a folder, or an existing file
    that `is_mine(old_text)` does not recognise as this tool's (e.g. JSON with this tool's `written_by`)."""
    final = Path(path).expanduser()
    if final.is_symlink():
        raise ConversionError(f"{path} is a symlink (to {os.readlink(final)}): name the file itself, or a new one")
    if not final.exists():
        return
    if final.is_dir():
        raise ConversionError(f"{path} is a folder: name a file to write")
    if not final.is_file():
        raise ConversionError(f"{path} is not a regular file (a device, a pipe, ...): name a file to write")
    try:
        mine = is_mine(final.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        mine = False
    if not mine:
        raise ConversionError(f"{path} exists and was not written by {written_by}: move it away or name a new file")


def write_text_output(path: str | Path, text: str, written_by: str, is_mine) -> None:
    """Write a one-file output atomically (a temporary sibling renamed over it), replacing only a file this tool
    wrote (`check_text_output`); a parent folder it creates is removed again if the write fails."""
    check_text_output(path, written_by, is_mine)
    final = Path(path).expanduser()
    created = _make_parents(final.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    except OSError as err:
        _remove_empty(created)
        raise ConversionError(f"cannot write in {final.parent} ({err.strerror or err}): name another file")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
            _remove_empty(created)
