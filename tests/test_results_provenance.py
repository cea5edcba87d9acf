"""Every results file under benchmarks/results (markdown and JSON) names the commit and the machine it came from, and
the commits it names exist in this repository's history."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FILES = sorted(path for path in RESULTS.rglob("*") if path.suffix in (".md", ".json"))
HASH = r"[0-9a-f]{7,40}"
# "at commit <hash>" (header), "**Commit:** `<hash>`" (study reports), "committed in <hash>" (runs from before the
# commit was recorded), "a clone of main at <hash>" (a log that says where it ran)
MARKDOWN_COMMIT = re.compile(rf"(?:\bcommit\b[\s*:`]*|\bcommitted in |\bclone of main at )({HASH})\b", re.IGNORECASE)
MARKDOWN_MACHINE = re.compile(r"\bmachine\b\**:", re.IGNORECASE)


def json_commits(data: dict) -> list[str]:
    """The commits a results JSON names: the one its run started from (`machine.commit`, as `machine_info` records
    it) and, for a run from before that, the one that added it (`committed_in`)."""
    machine = data.get("machine")
    named = [machine.get("commit") or ""] if isinstance(machine, dict) else []
    named.append(data.get("committed_in") or "")
    return [match.group(1) for text in named if (match := re.match(rf"({HASH})\b", text))]


def commits_of(path: Path) -> list[str]:
    if path.suffix == ".md":
        return MARKDOWN_COMMIT.findall(path.read_text(encoding="utf-8"))
    return json_commits(json.loads(path.read_text(encoding="utf-8")))


def full_history() -> bool:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return False
    shallow = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"], capture_output=True,
                             text=True, check=False)
    return shallow.returncode == 0 and shallow.stdout.strip() == "false"


def files(params=FILES):
    return [pytest.param(path, id=str(path.relative_to(RESULTS))) for path in params]


def test_there_are_results_files():
    assert len(FILES) > 20 and {path.suffix for path in FILES} == {".md", ".json"}


@pytest.mark.parametrize("path", files())
def test_results_file_names_its_commit_and_machine(path):
    if path.suffix == ".md":
        text = path.read_text(encoding="utf-8")
        assert MARKDOWN_COMMIT.search(text), f"{path.name} names no commit"
        assert MARKDOWN_MACHINE.search(text), f"{path.name} names no machine"
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        assert json_commits(data), f"{path.name} names no commit (machine.commit or committed_in)"
        machine = data.get("machine")
        assert machine and (isinstance(machine, str) or machine.get("cpu")), f"{path.name} names no machine"


@pytest.mark.skipif(not full_history(), reason="needs git and the repository's full history")
def test_named_commits_exist():
    """A results file cites commits of this history (not a typo, not a commit that a rebase dropped)."""
    named = sorted({commit for path in FILES for commit in commits_of(path)})
    assert named
    missing = [commit for commit in named if subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True, check=False
    ).returncode != 0]
    assert not missing, f"results files cite commits that are not in this history: {missing}"


def test_a_file_without_provenance_fails(tmp_path):
    """The checks can fail: a header without its commit line, a JSON with neither commit."""
    text = "# speed\n\nProduced by `python -m benchmarks.speed.speed` on 2026-11-25.\n\n- Machine: AMD EPYC, 2 cores\n"
    assert not MARKDOWN_COMMIT.search(text) and MARKDOWN_MACHINE.search(text)
    assert MARKDOWN_COMMIT.search(text.replace("on 2026-11-25.", "on 2026-11-25, at commit 88d45c0."))
    assert json_commits({"machine": {"cpu": "x", "commit": "unknown"}}) == []
    assert json_commits({"machine": {"cpu": "x", "commit": "88d45c0eb33b2e80dcb39de041f290d9a08fc823+changes"}}) == [
        "88d45c0eb33b2e80dcb39de041f290d9a08fc823"]
    assert json_commits({"machine": "x86_64", "committed_in": "3f9af31 (2026-11-25 02:20 UTC)"}) == ["3f9af31"]
