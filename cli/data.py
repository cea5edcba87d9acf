"""Text corpora for `train` and `eval`: Python's own docs by default, a local file/folder, or an HF dataset."""

import json
from pathlib import Path

from modeling_diff_eval.corpus import python_docs_texts, split_documents

from .common import CLIError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".jsonl", ".json"}


def load_texts(dataset: str | None) -> list[str]:
    """Documents of the corpus named by `--dataset`.

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
        raise CLIError(f"the corpus {dataset or 'pydoc_data.topics'} is empty: it holds no text")
    return texts


def read_text(path: Path, max_undecodable: float = 0.01) -> str:
    """The file's text; refuses a file that is not text: NUL bytes, or more than `max_undecodable` of its
    characters not UTF-8 (a few stray bytes in a text file are replaced)."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    undecodable = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if b"\0" in data or undecodable > max_undecodable * max(len(text), 1):
        raise CLIError(f"{path} is not a text file (NUL bytes or undecodable UTF-8): give a .txt, .md or .jsonl file")
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
                raise CLIError(f'{path}:{n} is not a JSON line; a .jsonl corpus needs one {{"text": ...}} per line')
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CLIError(f'{path}:{n} has no string field "text"')
            texts.append(record["text"])
        return texts
    return [block for block in read_text(path).split("\n\n") if block.strip()]


def _load_hf_dataset(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CLIError(
            f"unknown dataset {name!r}: not a local file or folder, and the `datasets` package is not "
            "installed to look it up on the Hub (pip install datasets)"
        )
    try:
        data = datasets.load_dataset(name, split="train")
    except Exception as err:
        raise CLIError(
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
