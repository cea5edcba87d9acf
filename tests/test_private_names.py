"""Shipped code uses transformers through its public interfaces: no private name, which the next release may change.

Scanned: modeling_diff/ (the model files that ship with checkpoints), serving/ (modeling_diff_serving) and cli/. A
failure names the file, the line and the name, for:
- an import of a private name or module: `from transformers.x import _y`, `import transformers._x`;
- a private attribute reached in transformers: `transformers.x._y`, `Name._y` for a `Name` imported from
  transformers, or `obj._y` where `_y` is no name of this project (so it is transformers', whose objects these
  modules handle: a tokenizer's `_tokenizer`, a model's `_cached_continuous_batching_manager`); attributes of other
  libraries' imports (`torch._C`) are not transformers' and are left alone;
- a private method or attribute of a transformers class overridden by a subclass (checked on the imported classes).

A model legitimately uses the hooks transformers' own model files use (`_init_weights`, `_supports_sdpa`,
`config._attn_implementation`, ...). The names allowed are the private names found, by parsing them here, in the
installed transformers' `models/llama/modeling_llama.py` and `models/diffllama/modeling_diffllama.py` (transformers'
own differential-attention model, built on Llama): not a list kept by hand.
"""

import ast
import importlib
import inspect
import pkgutil
import textwrap
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[1]
SCANNED = {"modeling_diff": "modeling_diff", "serving": "modeling_diff_serving", "cli": "modeling_diff_cli"}
REFERENCE_MODELS = ("llama/modeling_llama.py", "diffllama/modeling_diffllama.py")


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def identifiers(tree: ast.AST) -> set[str]:
    """Every name a module defines or uses: names, attributes, functions, classes, arguments, keywords."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            found.add(node.arg)
    return found


ALLOWED = {
    name
    for model in REFERENCE_MODELS
    for name in identifiers(ast.parse((Path(transformers.__file__).parent / "models" / model).read_text()))
    if private(name)
}


def scanned_files() -> list[Path]:
    return sorted(path for folder in SCANNED for path in (ROOT / folder).rglob("*.py"))


def defined(tree: ast.AST) -> set[str]:
    """The names a module defines: functions, classes, arguments, and what it assigns (`x`, `self.x`; not
    `model.x`, which sets another object's attribute)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and root_name(node.value) in SELF:
            found.add(node.attr)
    return found


def imported(tree: ast.AST) -> tuple[set[str], set[str]]:
    """The names bound by imports: (those from transformers, those from other libraries)."""
    from_transformers, others = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module or "" if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                source = module if module is not None else alias.name
                bound = alias.asname or alias.name.split(".")[0]
                (from_transformers if source.split(".")[0] == "transformers" else others).add(bound)
    return from_transformers, others - from_transformers


SELF = ("self", "cls")


def root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


OURS = {name for path in scanned_files() for name in defined(ast.parse(path.read_text()))}


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def test_no_private_transformers_imports():
    found = []
    for path in scanned_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers":
                names = node.module.split(".") + [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names if alias.name.split(".")[0] == "transformers"]
                names = [part for module in modules for part in module.split(".")]
            else:
                continue
            found += [f"{where(path, node)} imports {name}" for name in names if private(name)]
    assert not found, "private transformers names imported:\n" + "\n".join(found)


def test_no_private_transformers_attributes():
    found = []
    for path in scanned_files():
        tree = ast.parse(path.read_text())
        from_transformers, from_others = imported(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not private(node.attr) or node.attr in ALLOWED:
                continue
            root = root_name(node.value)
            upstream = root in from_transformers or root == "super"  # super(): a transformers base's, if any
            if upstream or (root not in from_others and node.attr not in OURS):
                found.append(f"{where(path, node)} uses {ast.unparse(node)}")
    assert not found, "private transformers attributes used:\n" + "\n".join(found)


def class_body_names(cls) -> set[str]:
    """The names a class's own source defines (not those set on it at run time, such as `_auto_class`)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {name for node in body for name in defined(node)}


def test_no_private_transformers_method_overridden():
    found = []
    for folder, package in SCANNED.items():
        names = [package] + [f"{package}.{info.name}" for info in pkgutil.iter_modules([str(ROOT / folder)])]
        for module in map(importlib.import_module, names):
            for cls in vars(module).values():
                if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                    continue
                upstream = [base for base in cls.__mro__ if base.__module__.split(".")[0] == "transformers"]
                ours = [own for own in cls.__mro__ if own.__module__.split(".")[0] in SCANNED.values()]  # mixins too
                for own in ours:
                    for name in class_body_names(own):
                        if private(name) and name not in ALLOWED and any(name in vars(base) for base in upstream):
                            found.append(f"{own.__module__}.{own.__name__} overrides transformers' {name}")
    found = sorted(set(found))
    assert not found, "private transformers methods or attributes overridden:\n" + "\n".join(found)


def test_the_allowed_names_come_from_transformers_own_models():
    # what the model file overrides and reads, as transformers' Llama and DiffLlama do
    assert {"_init_weights", "_supports_sdpa", "_attn_implementation", "_no_split_modules"} <= ALLOWED
    assert not {"_tokenizer", "_cached_continuous_batching_manager", "_validate_request"} & ALLOWED
