"""`diff-transformer push`: upload a model folder to the Hugging Face Hub (or list what would go, --dry-run)."""

from pathlib import Path

from .common import WEIGHT_FILES, CLIError


def add_arguments(parser):
    parser.add_argument("model_dir", help="the folder to upload (e.g. one written by convert, train or demo)")
    parser.add_argument("repo_id", help="the Hub repository, as user/name or org/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--commit-message", default="Upload DiffTransformer model", help="the commit's message")
    parser.add_argument("--dry-run", action="store_true", help="list every file and its size, upload nothing")


def check_repo_id(repo_id: str, owner_required: bool = True) -> None:
    """Refuse a repo id the Hub would refuse (huggingface_hub's own validator), and one without its owner unless
    not `owner_required` (a bare name is then the token owner's)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise CLIError(f"repo id {repo_id!r} is not valid on the Hub: {str(err).splitlines()[0]}")
    if owner_required and repo_id.count("/") != 1:
        raise CLIError(f"repo id {repo_id!r} must look like user/name")


def files_to_upload(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file that would be uploaded, hidden files and folders excluded."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((rel.as_posix(), path.stat().st_size))
    return files


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def run(args) -> int:
    folder = Path(args.model_dir).expanduser()
    if not folder.is_dir():
        raise CLIError(f"{args.model_dir} is not a folder")
    if not (folder / "config.json").is_file() or not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise CLIError(f"{args.model_dir} is not a model folder: it needs config.json and weights")
    check_repo_id(args.repo_id)
    files = files_to_upload(folder)
    total = sum(size for _, size in files)
    for name, size in files:
        print(f"{human(size):>10}  {name}")
    print(
        f"{len(files)} files, {human(total)} -> https://huggingface.co/{args.repo_id}"
        + (f" (revision {args.revision})" if args.revision else "")
    )
    if args.dry_run:
        print("dry run: nothing was uploaded")
        return 0

    url = upload_folder(folder, args.repo_id, args.private, args.revision, args.commit_message)
    print(f"uploaded: {url}")
    return 0


def upload_folder(folder: Path, repo_id: str, private=False, revision=None, message="Upload model", token=None) -> str:
    """Upload every file of `files_to_upload(folder)` as one commit (creating the repository if missing).

    The token comes from `token`, else HF_TOKEN or `hf auth login`, as usual. Returns the commit's URL.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    files = files_to_upload(folder)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name, _ in files]
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # a bare name: the user's own
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # one commit with exactly the files listed by files_to_upload
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)
    except Exception as err:
        raise CLIError(f"upload to {repo_id} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return getattr(info, "commit_url", info)
