"""Causal-LM training data: documents packed into blocks of tokens, and a memory check before any work."""

import psutil
import torch
from torch.utils.data import Dataset

from .arguments import TrainingError


class TokenBlocks(Dataset):
    """Documents joined with EOS and cut into blocks of `seq_len` tokens (the usual causal-LM packing).

    The tail that does not fill a block is dropped; `num_tokens` counts every token, so that a caller can say why a
    short text gave no block at all.
    """

    def __init__(self, texts: list[str], tokenizer, seq_len: int):
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for text in texts:
            ids += tokenizer(text, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
        self.num_tokens = len(ids)
        n = len(ids) // seq_len
        self.blocks = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (n, seq_len)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def check_fits_in_memory(
    config, seq_len: int, batch_size: int, training: bool = True, gradient_checkpointing: bool = False
):
    """Refuse a sequence length whose activations cannot fit in this machine's free memory (a rough estimate)."""
    if seq_len < 1 or batch_size < 1:
        raise TrainingError(f"the sequence length ({seq_len}) and the batch size ({batch_size}) must be positive")
    max_positions = getattr(config, "max_position_embeddings", None)
    tokens = seq_len * batch_size
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_token = config.vocab_size * 3  # logits, their softmax and gradient
    per_layer = hidden * 16 + config.intermediate_size * 4  # saved activations of one layer, fp32 words
    if training:
        per_token += (1 if gradient_checkpointing else layers) * per_layer
    need = tokens * per_token * 4
    available = psutil.virtual_memory().available
    if need > 0.8 * available:
        raise TrainingError(
            f"sequence length {seq_len} with batch {batch_size} needs about {need / 2**30:.1f} GiB of activations but "
            f"{available / 2**30:.1f} GiB is free; lower the sequence length or the batch size"
            + ("" if gradient_checkpointing or not training else ", or turn on activation checkpointing")
        )
    if max_positions is not None and seq_len > 4 * max_positions:
        raise TrainingError(
            f"sequence length {seq_len} is far beyond the model's max_position_embeddings ({max_positions})"
        )
