"""Upload a model folder to the Hugging Face Hub: what goes, what is held back and why.

`upload_plan(folder)` decides, file by file: hidden files and folders stay (this tool's marker among them), and so do
files that are not regular files, symlinks that lead out of the folder, and files that hold a secret (a Hugging Face
token, a private key). `upload_folder` uploads exactly the planned files as one commit.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .source import ConversionError

# a Hugging Face user access token, and the first line of a PEM private key (ssh, TLS)
SECRETS = {
    "a Hugging Face token": re.compile(rb"hf_[A-Za-z0-9]{30,}"),
    "a private key": re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"),
}
CHUNK = 16 * 2**20


@dataclass
class UploadPlan:
    """The files `upload_folder` would upload, as (path in the repo, bytes), and those it holds back, with why."""

    folder: Path
    files: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def check_repo_id(repo_id: str, owner_required: bool = True) -> None:
    """Refuse a repo id the Hub would refuse (huggingface_hub's own validator), and one without its owner unless
    not `owner_required` (a bare name is then the token owner's)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConversionError(f"repo id {repo_id!r} is not valid on the Hub: {str(err).splitlines()[0]}")
    if owner_required and repo_id.count("/") != 1:
        raise ConversionError(f"repo id {repo_id!r} must look like user/name")


def known_tokens(token: str | None = None) -> list[bytes]:
    """The token this upload would use (`token`, else HF_TOKEN or `hf auth login`'s): found anywhere in a file, that
    file stays, whatever the token looks like."""
    from huggingface_hub import get_token

    tokens = [token, get_token()]
    return [t.encode() for t in dict.fromkeys(tokens) if t and len(t) >= 8]


def _masked(secret: bytes) -> str:
    return secret[:5].decode(errors="replace") + "…"


def secret_in(path: Path, tokens: list[bytes]) -> str | None:
    """What secret `path` holds ("a Hugging Face token (hf_Ab…)"), or None. A .safetensors file is read up to the end
    of its header (its tensors are numbers); every other file whole, in chunks."""
    limit = None
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            limit = 8 + int.from_bytes(f.read(8), "little")
    overlap, tail, read = 4096, b"", 0
    with open(path, "rb") as f:
        while limit is None or read < limit:
            chunk = f.read(CHUNK if limit is None else min(CHUNK, limit - read))
            if not chunk:
                break
            read += len(chunk)
            data = tail + chunk
            for token in tokens:
                if token in data:
                    return f"the token this upload uses ({_masked(token)})"
            for what, pattern in SECRETS.items():
                found = pattern.search(data)
                if found:
                    return f"{what} ({_masked(found.group())})"
            tail = data[-overlap:]
    return None


def upload_plan(folder: str | Path, token: str | None = None) -> UploadPlan:
    """Which files of `folder` `upload_folder` uploads, and which it holds back and why (see the module's doc)."""
    folder = Path(folder)
    real = Path(os.path.realpath(folder))
    plan = UploadPlan(folder)
    tokens = known_tokens(token)
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if name.startswith("."):
                plan.skipped.append((rel + "/", "hidden"))
                dirs.remove(name)
            elif path.is_symlink():  # os.walk does not descend into it: say so
                target = os.path.realpath(path)
                where = "outside the folder" if not Path(target).is_relative_to(real) else "a folder inside this one"
                plan.skipped.append((rel + "/", f"a symlink to {target}, {where}: symlinked folders are not followed"))
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts):
                plan.skipped.append((rel, "hidden"))
                continue
            target = Path(os.path.realpath(path))
            if path.is_symlink() and not target.is_relative_to(real):
                plan.skipped.append((rel, f"a symlink to {target}, outside the folder"))
                continue
            if not path.is_file():
                plan.skipped.append((rel, "not a regular file"))
                continue
            try:
                secret = secret_in(path, tokens)
            except OSError as err:
                plan.skipped.append((rel, f"unreadable ({err.strerror or err})"))
                continue
            if secret:
                plan.skipped.append((rel, f"holds {secret}: delete it, or remove the secret from it"))
                continue
            plan.files.append((rel, path.stat().st_size))
    return plan


def upload_folder(
    folder: str | Path, repo_id: str, private=False, revision=None, message="Upload model", token=None, plan=None
) -> str:
    """Upload the files `upload_plan(folder)` lists (or `plan`'s) as one commit, creating the repository if missing.

    The token comes from `token`, else HF_TOKEN or `hf auth login`, as usual. Returns the commit's URL.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    plan = plan or upload_plan(folder, token)
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name, _ in plan.files]
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # a bare name: the user's own
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # one commit with exactly the planned files
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)
    except Exception as err:
        raise ConversionError(f"upload to {repo_id} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return getattr(info, "commit_url", info)
