"""The text study's data: Python's reference docs and the standard library's docstrings, a byte-level BPE trained
on them, and the training sequences (text windows and multi-needle examples, the same for every model of a seed)."""

import functools
import random

from benchmarks.studies.text.config import Settings

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2


@functools.lru_cache(maxsize=1)
def corpus():
    """(train texts, held-out texts). Held-out = the held-out Python docs that `run_task` evaluates by default."""
    from modeling_diff_eval.corpus import python_docs_texts, split_documents, stdlib_docstrings

    docs_train, docs_held_out = split_documents(python_docs_texts())
    strings_train, _ = split_documents(stdlib_docstrings())
    return docs_train + strings_train, docs_held_out


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a 🤗 fast tokenizer (<pad>=0, <s>=1, </s>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def training_sequences(tokenizer, train_texts: list[str], settings: Settings, seed: int) -> list[dict]:
    """The `steps · batch_size` training sequences of one seed, the same for every model.

    Text sequences are consecutive `seq_len`-token windows (BOS first) of the training texts, taken from a random
    start. Needle sequences hold N ∈ [1, train_max_needles] needles with train-pool keys in a haystack of training
    text, followed by queries for all N needles in random order; they are right-padded to `seq_len` (padding is
    not trained on). Loss is the plain causal-LM loss on every non-pad token of both kinds.
    """
    from modeling_diff_eval.needle import build_example, needle_specs, tokenizer_encoder
    from modeling_diff_eval.tasks import token_stream

    rng = random.Random(f"train:{seed}")
    stream = token_stream(tokenizer, train_texts)
    encode = functools.lru_cache(maxsize=None)(tokenizer_encoder(tokenizer))
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    total = settings.steps * settings.batch_size
    query_room = 1 + settings.train_max_needles * 16  # newline + per query ~14 tokens (prefix ~10, value ~4, ".")
    sequences = []
    position = rng.randrange(len(stream))
    for index in range(total):
        if rng.random() < settings.needle_fraction:
            n = rng.randint(1, settings.train_max_needles)
            spec = needle_specs(1, n, n, seed=rng.randrange(2**31), split="train")[0]
            context_len = settings.seq_len - query_room
            ids = build_example(spec, encode, stream, context_len, bos).input_ids[: settings.seq_len]
        else:
            body = settings.seq_len - 1
            if position + body > len(stream):
                position = 0
            ids = [bos] + stream[position : position + body]
            position += body
        labels = ids + [-100] * (settings.seq_len - len(ids))
        sequences.append({"input_ids": ids + [pad] * (settings.seq_len - len(ids)), "labels": labels})
    return sequences
