"""Blocks marked `# Copied from transformers.models.llama.modeling_llama.X` equal the installed Llama's X.

The convention of transformers' `utils/check_copies.py`: the marker stands directly above the `class` or `def` line
(decorators above it), `with A->B, C->D` renames in the original before comparing, and the whole block counts,
docstring and comments included. A drift fails with the block's name and a diff.
"""

import ast
import difflib
import re
from pathlib import Path

import pytest
import transformers.models.llama.modeling_llama as llama_module

import modeling_diff.modeling_diff_transformer as diff_module

MARKER = re.compile(r"^\s*# Copied from transformers\.models\.llama\.modeling_llama\.(\S+)(?: with (.+))?$")

# Llama's blocks this model is meant to share verbatim; a marker that disappears fails here too.
EXPECTED = {
    "LlamaRMSNorm",
    "LlamaRotaryEmbedding",
    "rotate_half",
    "apply_rotary_pos_emb",
    "LlamaMLP.forward",
    "repeat_kv",
    "eager_attention_forward",
    "LlamaDecoderLayer.forward",
    "LlamaModel",
    "LlamaForCausalLM.__init__",
}


def definitions(tree: ast.AST, prefix: str = "") -> dict[str, ast.AST]:
    """Dotted name -> class or function node, for every class, function and method."""
    found = {}
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            found[prefix + node.name] = node
            found.update(definitions(node, prefix + node.name + "."))
    return found


def block(lines: list[str], node: ast.AST) -> str:
    """The source of `node` from its `class`/`def` line to its end, decorators excluded, dedented."""
    text = lines[node.lineno - 1 : node.end_lineno]
    indent = len(text[0]) - len(text[0].lstrip())
    return "\n".join(line[indent:] for line in text)


def marked_blocks() -> list[tuple[str, str | None, str]]:
    """(Llama name, renames, our block) for every marker in the model file."""
    source = Path(diff_module.__file__).read_text()
    lines = source.splitlines()
    ours = {node.lineno: node for node in definitions(ast.parse(source)).values()}
    found = []
    for number, line in enumerate(lines, start=1):
        match = MARKER.match(line)
        if match:
            node = ours.get(number + 1)
            assert node is not None, f"line {number}: `{line.strip()}` is not directly above a class or def"
            found.append((match.group(1), match.group(2), block(lines, node)))
    return found


def test_the_expected_llama_blocks_are_marked():
    assert {name for name, _, _ in marked_blocks()} == EXPECTED


@pytest.mark.parametrize("name, renames, ours", [pytest.param(*marked, id=marked[0]) for marked in marked_blocks()])
def test_marked_block_equals_llama(name, renames, ours):
    source = Path(llama_module.__file__).read_text()
    theirs = definitions(ast.parse(source)).get(name)
    assert theirs is not None, f"{name} no longer exists in {llama_module.__file__}"
    expected = block(source.splitlines(), theirs)
    for rename in (renames or "").split(","):
        if rename.strip():
            old, new = (part.strip() for part in rename.split("->"))
            expected = expected.replace(old, new)
    if ours != expected:
        diff = difflib.unified_diff(expected.splitlines(), ours.splitlines(), "llama", "ours", lineterm="")
        pytest.fail(f"`Copied from {name}` drifted from the installed transformers:\n" + "\n".join(diff))
