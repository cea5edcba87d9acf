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
