"""Text corpora: the ones that exist offline on every machine with Python, and the user's own (`load_texts`: a file,
a folder or an HF datasets name), split into training and held-out documents (`train_eval_texts`)."""

import json
import random
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".jsonl", ".json"}


class EvaluationError(ValueError):
    """Bad input to evaluation (a corpus, a task's options): the CLI prints it as one line `error: ...`."""


def python_docs_texts() -> list[str]:
    """Python's own reference documentation (`pydoc_data.topics`): 79 topics, about 465k characters.

    Returned in a fixed order (sorted by topic name), one string per topic.
    """
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


def split_documents(texts: list[str], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministically split whole documents into (train, held_out); at least one document goes to each side."""
    if len(texts) < 2:
        raise EvaluationError(f"need at least 2 documents to split into train and held-out, got {len(texts)}")
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


def load_texts(dataset: str | None) -> list[str]:
    """Documents of the corpus `dataset` names (the CLI's `--dataset`).

    None: Python's reference documentation (`pydoc_data.topics`, on every machine with Python). A local `.txt`/`.md`
    file: one document per blank-line-separated block. A `.jsonl` file: the "text" field of each line. A folder: all
    such files inside. Anything else is tried as a Hugging Face `datasets` name (needs the network or its cache).
    """
    if dataset is None:
        texts = python_docs_texts()
    else:
        path = Path(dataset).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            texts = [t for f in files for t in _read_file(f)]
        elif path.is_file():
            texts = _read_file(path)
        else:
            texts = _load_hf_dataset(dataset)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise EvaluationError(f"the corpus {dataset or 'pydoc_data.topics'} is empty: it holds no text")
    return texts


def read_text(path: Path, max_undecodable: float = 0.01) -> str:
    """The file's text; refuses a file that is not text: NUL bytes, or more than `max_undecodable` of its
    characters not UTF-8 (a few stray bytes in a text file are replaced)."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    undecodable = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if b"\0" in data or undecodable > max_undecodable * max(len(text), 1):
        raise EvaluationError(
            f"{path} is not a text file (NUL bytes or undecodable UTF-8): give a .txt, .md or .jsonl file"
        )
    return text


def _read_file(path: Path) -> list[str]:
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise EvaluationError(
                    f'{path}:{n} is not a JSON line; a .jsonl corpus needs one {{"text": ...}} per line'
                )
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise EvaluationError(f'{path}:{n} has no string field "text"')
            texts.append(record["text"])
        return texts
    return [block for block in read_text(path).split("\n\n") if block.strip()]


def _load_hf_dataset(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise EvaluationError(
            f"unknown dataset {name!r}: not a local file or folder, and the `datasets` package is not "
            "installed to look it up on the Hub (pip install datasets)"
        )
    try:
        data = datasets.load_dataset(name, split="train")
    except Exception as err:
        raise EvaluationError(
            f"unknown dataset {name!r}: not a local file or folder, and the Hub could not provide it "
            f"({type(err).__name__})"
        )
    column = "text" if "text" in data.column_names else data.column_names[0]
    return [str(t) for t in data[column]]


def train_eval_texts(dataset: str | None, eval_fraction: float = 0.1, seed: int = 0):
    """(train documents, held-out documents): whole documents, split deterministically."""
    texts = load_texts(dataset)
    if len(texts) < 2:
        # a single document: hold out its tail, so that evaluation never sees training text
        cut = int(len(texts[0]) * (1 - eval_fraction))
        return [texts[0][:cut]], [texts[0][cut:]]
    return split_documents(texts, eval_fraction=eval_fraction, seed=seed)
