"""A saved folder loads with `trust_remote_code=True` where only torch and transformers are installed.

Every folder `save_pretrained` writes carries this package's model and config files; a Hub user loads them with
`trust_remote_code=True`, and transformers first scans those files for imports and refuses the folder if any imported
package is missing (`transformers.dynamic_module_utils.check_imports`). The rest of the suite runs where the test
extra installed peft, trl, accelerate and more, so it cannot see such a fault.

The environment is a real, separate virtual environment with `torch==2.13.0` and the transformers this suite runs on,
and nothing else but their own requirements. A real venv rather than an interpreter with the other packages made
unimportable: transformers decides what is missing with `importlib.import_module`, and hiding packages from it (a
meta-path blocker, `sys.modules[name] = None`) would test our blocker as much as transformers' check, and could hide
a package that a clean install really lacks or really has. The venv is built once and reused: under
`~/.cache/modeling-diff/clean-venv-torch<torch>-transformers<transformers>`, or the folder `MODELING_DIFF_CLEAN_VENV`
names (CI can point it at a cached path). Building it took 47 s here (pip's wheel cache warm, 2 cores); later
runs reuse it. The first test checks that peft, accelerate, trl and this package are absent there.

The tests in the suite's own process check the shipped files with transformers' own import scan (fast, every
transformers in the range).
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from helpers import tiny_config
from transformers.dynamic_module_utils import get_imports

import modeling_diff
from modeling_diff import DiffTransformerForCausalLM

SHIPPED = ["configuration_diff_transformer.py", "modeling_diff_transformer.py"]
# What a machine with transformers installed always has: transformers, its requirement huggingface_hub, and torch.
ALLOWED = {"torch", "transformers", "huggingface_hub"}
OPTIONAL = ["peft", "accelerate", "trl", "optimum", "modeling_diff"]  # in the test extra, absent where users are
CLEAN_PACKAGES = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_files_import_only_torch_and_transformers(name):
    """transformers' own scan of a remote-code file finds nothing but torch, transformers and the standard library."""
    imports = set(get_imports(Path(modeling_diff.__file__).parent / name))
    assert imports - set(sys.stdlib_module_names) <= ALLOWED, imports


GUARD = "    if is_peft_available():\n"


def without_the_guard(source: str) -> str:
    """The model file with `register_peft_defaults` as it was before: an early `return` instead of the guard."""
    head, rest = source.split(GUARD)
    body, tail = rest.split("\n\n\n", 1)
    body = textwrap.indent(textwrap.dedent(body), "    ")  # one level out of the `if`
    return head + "    if not is_peft_available():\n        return\n" + body + "\n\n\n" + tail


def test_the_import_scan_sees_an_optional_import_outside_its_guard(tmp_path):
    """The check above can fail: `register_peft_defaults` with an early `return` instead of its guard, as it was
    written before, is found by the same scan (an early return hides nothing from it)."""
    source = (Path(modeling_diff.__file__).parent / "modeling_diff_transformer.py").read_text()
    assert source.count(GUARD) == 1 and "from peft" in source
    (tmp_path / "modeling.py").write_text(without_the_guard(source))
    compile(without_the_guard(source), "modeling.py", "exec")
    assert "peft" in get_imports(tmp_path / "modeling.py")


def clean_venv() -> Path:
    """The clean environment's python, built on first use (see the module docstring)."""
    version = f"torch{CLEAN_PACKAGES[0].split('==')[1]}-transformers{transformers.__version__}"
    default = Path.home() / ".cache" / "modeling-diff" / f"clean-venv-{version}"
    venv = Path(os.environ.get("MODELING_DIFF_CLEAN_VENV", default))
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time: pytest-xdist workers (or two runs) that need it together wait for the first to finish
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "complete").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            # torch alone first and pinned: the local CPU wheel (an unpinned torch would pull GBs of CUDA packages)
            for packages in (CLEAN_PACKAGES[:1], CLEAN_PACKAGES):
                result = subprocess.run(pip + packages, capture_output=True, text=True, timeout=900)
                assert result.returncode == 0, f"building the clean venv at {venv} failed:\n{result.stderr[-3000:]}"
            (venv / "complete").write_text(" ".join(CLEAN_PACKAGES))
    return python


def run_clean(script: str, *args, tmp_path: Path) -> subprocess.CompletedProcess:
    """`script` in the clean venv, offline, outside the repository, with its own HF modules cache."""
    path = tmp_path / "clean_script.py"
    path.write_text(textwrap.dedent(script))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    return subprocess.run([str(clean_venv()), str(path), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


LOAD_EVERY_HEAD = """
    import importlib.util, json, sys
    import torch, transformers

    torch.set_num_threads(int(sys.argv[3]))
    absent = [name for name in {optional} if importlib.util.find_spec(name) is not None]
    assert not absent, f"the clean venv has {{absent}}"
    ids = torch.load(sys.argv[2])
    results = {{}}
    for folder in json.loads(sys.argv[1]):
        auto_class = folder.rsplit("/", 1)[-1]
        model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            out = model(ids)
        results[folder] = {{key: value for key, value in out.items() if torch.is_tensor(value)}}
        if auto_class == "AutoModelForCausalLM":
            results[folder]["generate"] = model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0,
                                                         eos_token_id=None)
    torch.save(results, "results.pt")
"""


def save_every_head(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """V1 and V2, each head saved in `root/v{1,2}/<Auto class>` with all its weights; the package's outputs."""
    ids = torch.randint(3, 97, (2, 9))
    torch.save(ids, root / "ids.pt")
    expected = {}
    for version in (1, 2):
        for auto_class, head in modeling_diff.HEADS.items():
            torch.manual_seed(version)
            model = head(tiny_config(version, num_labels=3)).eval()
            folder = root / f"v{version}" / auto_class.__name__
            model.save_pretrained(folder)
            with torch.no_grad():
                out = model(ids)
            expected[str(folder)] = {key: value for key, value in out.items() if torch.is_tensor(value)}
            if head is DiffTransformerForCausalLM:
                expected[str(folder)]["generate"] = model.generate(
                    ids, do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None
                )
    return expected


@pytest.mark.slow
def test_every_head_of_v1_and_v2_loads_with_trust_remote_code_in_a_clean_venv(tmp_path):
    """Ten folders (V1 and V2, five heads) load in the clean venv as remote code and give the package's outputs:
    every tensor of each head's output equal, the causal LM's greedy tokens equal."""
    expected = save_every_head(tmp_path)
    script = LOAD_EVERY_HEAD.format(optional=OPTIONAL)
    result = run_clean(script, json.dumps(list(expected)), tmp_path / "ids.pt", torch.get_num_threads(),
                       tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    theirs = torch.load(tmp_path / "results.pt")
    assert theirs.keys() == expected.keys()
    for folder, outputs in expected.items():
        assert theirs[folder].keys() == outputs.keys(), folder
        for key, value in outputs.items():
            if key == "generate":
                assert torch.equal(theirs[folder][key], value), folder
            else:
                torch.testing.assert_close(theirs[folder][key], value, rtol=1e-6, atol=1e-6, msg=f"{folder} {key}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda source: "import peft\n" + source, id="module-level"),
        pytest.param(without_the_guard, id="after-an-early-return"),  # the function as it was before
    ],
)
def test_the_clean_venv_refuses_a_folder_whose_model_file_imports_peft(tmp_path, edit):
    """The test above can fail: the same clean venv refuses a copy of a saved folder whose model file imports peft
    outside an `if is_..._available():` block, with transformers' ImportError naming peft."""
    folder = tmp_path / "AutoModelForCausalLM"
    DiffTransformerForCausalLM(tiny_config(1)).save_pretrained(folder)
    modeling = folder / "modeling_diff_transformer.py"
    edited = edit(modeling.read_text())
    assert edited != modeling.read_text()
    modeling.write_text(edited)
    script = """
        import sys, transformers
        try:
            transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        except ImportError as error:
            print(error)
            raise SystemExit(3)
    """
    result = run_clean(script, folder, tmp_path=tmp_path)
    assert result.returncode == 3, result.stderr[-4000:]
    assert "requires the following packages that were not found in your environment: peft" in result.stdout
