"""`diff-transformer push`: upload a model folder to the Hugging Face Hub (or list what would go, --dry-run).

Hidden files, symlinks that lead out of the folder and files that hold a secret (a Hugging Face token, a private key)
are never uploaded: each is listed as skipped, with why.
"""

from pathlib import Path

from modeling_diff_conversion.hub import check_repo_id, upload_folder, upload_plan
from modeling_diff_conversion.loading import WEIGHT_FILES

from .common import CLIError


def add_arguments(parser):
    parser.add_argument("model_dir", help="the folder to upload (e.g. one written by convert, train or demo)")
    parser.add_argument("repo_id", help="the Hub repository, as user/name or org/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--commit-message", default="Upload DiffTransformer model", help="the commit's message")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list every file and its size, and what is skipped and why; upload nothing",
    )


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def run(args) -> int:
    folder = Path(args.model_dir).expanduser()
    if not folder.is_dir():
        raise CLIError(f"{args.model_dir} is not a folder")
    check_repo_id(args.repo_id)
    plan = upload_plan(folder)
    uploaded = {name for name, _ in plan.files}
    if "config.json" not in uploaded or not uploaded & set(WEIGHT_FILES):
        why = dict(plan.skipped).get("config.json") or next(
            (f"{name}: {reason}" for name, reason in plan.skipped if name in WEIGHT_FILES), None
        )
        raise CLIError(
            f"{args.model_dir} is not a model folder: it needs config.json and weights"
            + (f" to upload (skipped {why})" if why else "")
        )
    for name, size in plan.files:
        print(f"{human(size):>10}  {name}")
    for name, reason in plan.skipped:
        print(f"{'skipped':>10}  {name}: {reason}")
    print(
        f"{len(plan.files)} files, {human(plan.total_bytes)} -> https://huggingface.co/{args.repo_id}"
        + (f" (revision {args.revision})" if args.revision else "")
        + (f"; {len(plan.skipped)} skipped" if plan.skipped else "")
    )
    if args.dry_run:
        print("dry run: nothing was uploaded")
        return 0

    url = upload_folder(folder, args.repo_id, args.private, args.revision, args.commit_message, plan=plan)
    print(f"uploaded: {url}")
    return 0
