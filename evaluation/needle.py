"""Multi-needle retrieval examples in the format of the Differential Transformer paper (§3.4, Table 2).

N needles ``"The magic number for X is Y."`` are hidden at random depths in filler text, then R of them are
queried by repeating the needle's prefix ``"The magic number for X is"``; the model must continue with ``Y``.

Generation happens in two steps so that it is deterministic and tokenizer-free where it can be:

1. `needle_specs(samples, needles, queries, seed, split)` draws the keys, values, depths, query order and filler
   offset of every example from `random.Random(seed)`; no tokenizer involved.
2. `build_example(spec, encode, filler_ids, context_len)` turns one spec into token ids with any tokenizer: each
   piece (needle prefix, value, period) is encoded on its own and the ids are concatenated, so the needle, the
   query and the answer tokenise identically whatever the tokenizer's merges across word boundaries.

Keys are pronounceable pseudo-words (``"bako"``, ``"zuri"``) from a fixed pool that a fixed seed splits once into
a train part and an eval part, so training examples and evaluation examples never share a key.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .corpus import EvaluationError

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
KEY_POOL_SEED = 2410_05258  # the paper's arXiv id; fixes the train/eval split of the key pool once and for all
EVAL_KEY_FRACTION = 0.2
VALUE_RANGE = (100, 999)  # values are 3-digit numbers
NEEDLE_PREFIX = " The magic number for {key} is"


def _all_keys() -> list[str]:
    """Every two-syllable pseudo-word, consonant-vowel-consonant-vowel: 70 × 70 = 4900 keys, in sorted order."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    return [a + b for a in syllables for b in syllables]


def key_pool(split: str) -> list[str]:
    """The keys of one split, ``"train"`` (80%, 3920 keys) or ``"eval"`` (20%, 980 keys); the two never overlap."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    keys = _all_keys()
    random.Random(KEY_POOL_SEED).shuffle(keys)
    n_eval = round(len(keys) * EVAL_KEY_FRACTION)
    return sorted(keys[:n_eval]) if split == "eval" else sorted(keys[n_eval:])


@dataclass
class NeedleSpec:
    """The tokenizer-free content of one example.

    `depths` are fractions of the filler (0 = start, 1 = end) where needle i goes; `query_order` lists the needles
    that are queried, in order; `filler_offset` in [0, 1) picks where in the filler text the haystack starts.
    """

    keys: list[str]
    values: list[int]
    depths: list[float]
    query_order: list[int]
    filler_offset: float


@dataclass
class NeedleExample:
    """One tokenised example.

    `input_ids` is the whole sequence (haystack, then the queries with their answers). Spans are half-open
    ``(start, end)`` token ranges: `needle_spans[i]` covers needle i in the haystack, `answer_spans[j]` the
    value tokens that answer query j, and `query_needles[j]` says which needle query j asks for. `context_end` is
    where the haystack ends (everything before it is context; the queries start there).
    """

    input_ids: list[int]
    needle_spans: list[tuple[int, int]]
    answer_spans: list[tuple[int, int]]
    query_needles: list[int]
    context_end: int
    spec: NeedleSpec = field(repr=False)


def needle_specs(samples: int, needles: int, queries: int = 1, seed: int = 0, split: str = "eval") -> list[NeedleSpec]:
    """`samples` specs with `needles` needles and `queries` queries each, the same for the same arguments.

    Keys come from `key_pool(split)` and are distinct within an example, as are the values; depths are uniform in
    [0, 1]; the queried needles are a random subset of size `queries` in random order.
    """
    if needles < 1 or not 1 <= queries <= needles:
        raise EvaluationError(
            f"need needles >= 1 and 1 <= queries <= needles, got needles={needles}, queries={queries}"
        )
    rng = random.Random(f"needle:{split}:{seed}")
    pool = key_pool(split)
    specs = []
    for _ in range(samples):
        keys = rng.sample(pool, needles)
        values = rng.sample(range(VALUE_RANGE[0], VALUE_RANGE[1] + 1), needles)
        depths = [rng.random() for _ in range(needles)]
        query_order = rng.sample(range(needles), queries)
        specs.append(NeedleSpec(keys, values, depths, query_order, rng.random()))
    return specs


def needle_pieces(encode: Callable[[str], list[int]], key: str, value: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the three pieces of a needle: prefix ``" The magic number for X is"``, ``" Y"`` and ``"."``."""
    return encode(NEEDLE_PREFIX.format(key=key)), encode(f" {value}"), encode(".")


def build_example(
    spec: NeedleSpec,
    encode: Callable[[str], list[int]],
    filler_ids: list[int],
    context_len: int,
    bos_id: int | None = None,
) -> NeedleExample:
    """Tokenise one spec: a haystack of exactly `context_len` tokens (BOS included), then the queries.

    The haystack is a window of `filler_ids` (repeated if too short) with the needles inserted at their depths,
    at token boundaries of the filler. Each query is the needle's prefix followed by its answer and a period, so a
    model scores a query right when it predicts every value token (teacher forcing = greedy decoding here).
    """
    pieces = [needle_pieces(encode, k, v) for k, v in zip(spec.keys, spec.values)]
    needle_ids = [p + v + d for p, v, d in pieces]
    prefix = [] if bos_id is None else [bos_id]
    filler_len = context_len - len(prefix) - sum(len(n) for n in needle_ids)
    if filler_len < 0:
        raise EvaluationError(f"context_len={context_len} is too short for {len(needle_ids)} needles")
    if not filler_ids:
        raise ValueError("filler_ids is empty")
    while len(filler_ids) < filler_len + 1:
        filler_ids = filler_ids + filler_ids
    start = int(spec.filler_offset * (len(filler_ids) - filler_len))
    filler = filler_ids[start : start + filler_len]

    ids = list(prefix)
    spans: list[tuple[int, int]] = [(0, 0)] * len(needle_ids)
    cursor = 0
    for i in sorted(range(len(needle_ids)), key=lambda i: (spec.depths[i], i)):
        cut = round(spec.depths[i] * filler_len)
        ids += filler[cursor:cut]
        cursor = cut
        spans[i] = (len(ids), len(ids) + len(needle_ids[i]))
        ids += needle_ids[i]
    ids += filler[cursor:]
    context_end = len(ids)
    assert context_end == context_len

    ids += encode("\n")
    answer_spans = []
    for i in spec.query_order:
        prompt, value, dot = pieces[i]
        ids += prompt
        answer_spans.append((len(ids), len(ids) + len(value)))
        ids += value + dot
    return NeedleExample(ids, spans, answer_spans, list(spec.query_order), context_end, spec)


def tokenizer_encoder(tokenizer) -> Callable[[str], list[int]]:
    """`encode(text) -> ids` without special tokens, for a 🤗 tokenizer (fast or slow) or a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
