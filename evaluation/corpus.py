"""Text corpora that exist offline on every machine with Python."""

import random


def python_docs_texts() -> list[str]:
    """Python's own reference documentation (`pydoc_data.topics`): 79 topics, about 465k characters.

    Returned in a fixed order (sorted by topic name), one string per topic.
    """
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


def split_documents(texts: list[str], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministically split whole documents into (train, held_out); at least one document goes to each side."""
    if len(texts) < 2:
        raise ValueError(f"need at least 2 documents to split into train and held-out, got {len(texts)}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(texts) - 1, max(1, round(len(texts) * eval_fraction)))
    held_out = set(order[:n_eval])
    train = [t for i, t in enumerate(texts) if i not in held_out]
    evaluation = [t for i, t in enumerate(texts) if i in held_out]
    return train, evaluation


# Folders of the standard library whose files are tests, demos or vendored code rather than documented API.
_SKIPPED_STDLIB_PARTS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__phello__"})


def stdlib_docstrings(min_chars: int = 40) -> list[str]:
    """The docstrings of the standard library's own source files, one string per module file.

    The files are read with `ast` (nothing is imported, so no module runs), in sorted path order: the top-level
    modules, then one level of packages, skipping tests, IDLE, demos and site-packages. Each document joins the
    module, class and function docstrings of one file (those of at least `min_chars` characters) with blank lines.
    About 1.5M characters on CPython 3.11; the exact text depends on the Python version, like `python_docs_texts`.
    """
    import ast
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    documents = []
    for path in files:
        if _SKIPPED_STDLIB_PARTS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc.strip())
        if docs:
            documents.append("\n\n".join(docs))
    return documents
