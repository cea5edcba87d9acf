"""Shared test builders: tiny configs, models and tokenizers, the CLI in a subprocess, an offline Hub, hashes of the
user's files."""

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from modeling_diff_eval.corpus import python_docs_texts
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM


def run_cli(*args, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    """`diff-transformer ARGS` in a fresh process, offline; arguments may be paths or numbers."""
    return subprocess.run(
        [sys.executable, "-m", "modeling_diff_cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})),
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str):
    """Exit status 2, exactly one `error:` line containing `pattern`, and no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def outcome(argv: list, capsys) -> tuple[int, str]:
    """`diff-transformer ARGV` in this process: (exit status, stderr)."""
    from modeling_diff_cli.main import main

    capsys.readouterr()  # what earlier steps printed
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


def error_line(argv: list, capsys, ran=None) -> str:
    """`diff-transformer ARGV` in this process (or the `outcome` it `ran` to), as `assert_one_line_error` checks it
    in a subprocess: status 2, exactly one `error:` line on stderr and no traceback; returns that line."""
    status, err = ran or outcome(argv, capsys)
    assert status == 2, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def add_to_hub_cache(cache_dir: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """Copy `folder` as the `main` snapshot of model repo `repo_id` under `cache_dir`; returns the snapshot path."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def tiny_config(diff_version=1, heads=8, kv_heads=4, **overrides):
    """A small DiffTransformer config; heads/kv_heads follow Llama's counting."""
    values = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        diff_version=diff_version,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return DiffTransformerConfig(**values)


LAYOUTS = {  # name: (diff_version, query heads, kv heads)
    "v1-mha": (1, 8, 8),
    "v1-gqa": (1, 8, 4),
    "v1-gqa4": (1, 8, 2),
    "v2-gqa": (2, 8, 4),
    "v2-gqa4": (2, 8, 2),
    "v2-mqa": (2, 8, 1),
}


def make_model(layout, attn="eager", peaked=True, **overrides):
    version, heads, kv = LAYOUTS[layout]
    config = tiny_config(version, heads, kv, **overrides)
    model = DiffTransformerForCausalLM._from_config(config, attn_implementation=attn).eval()
    if peaked:  # scale q and k so that the softmax maps are far from uniform
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(15.0)
                layer.self_attn.k_proj.weight.mul_(15.0)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 400-token BPE trained on Python's docs in well under a second."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(python_docs_texts()[:10], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


WITHOUT_THE_PACKAGE = """\
import sys
sys.modules["modeling_diff"] = None  # this process cannot import the package
try:
    import modeling_diff
    raise SystemExit("modeling_diff was importable")
except ImportError:
    pass
"""


def run_without_the_package(script: str, *args, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter that cannot import `modeling_diff` (only a model folder's copied code can
    serve it), offline, with its own HF modules cache under `tmp_path`."""
    path = tmp_path / "without_the_package.py"
    path.write_text(WITHOUT_THE_PACKAGE + textwrap.dedent(script))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def save_tiny_models(root: Path) -> Path:
    """A tiny DiffTransformer V2 (`root/diff`) and a tiny Llama (`root/llama`), saved with one shared tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    diff = DiffTransformerForCausalLM(DiffTransformerConfig(num_attention_heads=8, diff_version=2, **sizes))
    diff.save_pretrained(root / "diff")
    tokenizer.save_pretrained(root / "diff")
    llama = LlamaForCausalLM(LlamaConfig(num_attention_heads=4, **sizes))
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return root


def tree_hash(folder: Path) -> dict:
    """{relative path: sha256} of every file under `folder` (and every symlink, by its target's name): what must
    survive a refused command untouched."""
    return {
        p.relative_to(folder).as_posix(): ("-> " + os.readlink(p)) if p.is_symlink() else hashlib.sha256(
            p.read_bytes()
        ).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() or p.is_symlink()
    }


@contextlib.contextmanager
def undeletable(path: Path):
    """Make `path` impossible to delete for this process while the block runs: `chattr +i` as root (which nothing
    else stops), a read-only folder for any other user (the folder `path`)."""
    import pytest

    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported on this file system")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        folder = path if path.is_dir() else path.parent
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
