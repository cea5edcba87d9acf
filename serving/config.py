"""The server's options: a dataclass (HfArgumentParser makes a flag of each field), checked before anything loads."""

import os
from dataclasses import dataclass, field
from typing import Literal

API_KEY_VARIABLE = "DIFF_TRANSFORMER_API_KEY"
CPU_CACHE_SHARE = 0.05  # of the memory left after loading: 1.1 GB on a 24 GB machine (SmolLM2-135M: ~25K tokens)
CPU_MAX_BATCH_TOKENS = 1024


class ServingError(ValueError):
    """A bad option, or a model that cannot be served: one sentence saying what to do."""


def option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ServeArguments:
    host: str = option("127.0.0.1", "address to listen on. 0.0.0.0 takes requests from every network the machine is "
                       "on: then set an API key, and put TLS in front (the key travels in clear otherwise)")
    port: int = option(8000, "port to listen on (1-65535)")
    api_key: str | None = option(
        None, f"require `Authorization: Bearer KEY` on every endpoint but /health (else HTTP 401). Default: the "
        f"{API_KEY_VARIABLE} environment variable (better: a command line shows in `ps`), else no key"
    )
    continuous_batching: bool = option(True, "batch greedy requests with transformers' continuous batching; "
                                       "--no-continuous-batching: every request with generate(), one at a time")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "weights dtype (auto: as saved)")
    attn_implementation: str | None = option(None, "attention backend: sdpa (None), flash_attention_2, eager, ...")
    device: str = option("auto", "where the model runs: auto, cpu, cuda, cuda:1, mps")
    max_model_len: int | None = option(None, "the longest a request may be, prompt and answer, in tokens (None: the "
                                       "model's context)")
    max_batch_tokens: int | None = option(None, f"tokens per batched forward (None: {CPU_MAX_BATCH_TOKENS} on CPU, "
                                          "else transformers')")
    max_memory_percent: float | None = option(None, "share (0-1] of the memory left after loading for the paged KV "
                                              f"cache (None: {CPU_CACHE_SHARE} on CPU, else transformers')")
    num_blocks: int | None = option(None, "the paged KV cache's size in blocks of 256 tokens, instead of a share")
    max_request_bytes: int = option(2**20, "largest request body accepted (HTTP 413 above it)")
    request_timeout: float = option(30.0, "seconds a connection has to send a request's head, then its body (HTTP "
                                    "408), before it is closed")
    log_level: Literal["debug", "info", "warning", "error"] = option("warning", "server log level")

    def __post_init__(self):
        if not 1 <= self.port <= 65535:
            raise ServingError(f"--port must be between 1 and 65535, not {self.port}")
        if self.max_memory_percent is not None and not 0 < self.max_memory_percent <= 1:
            raise ServingError(f"--max-memory-percent must be above 0 and at most 1, not {self.max_memory_percent}")
        for name, smallest in (("max_batch_tokens", 1), ("num_blocks", 1), ("max_model_len", 2),
                               ("max_request_bytes", 1024), ("request_timeout", 0.1)):
            if (value := getattr(self, name)) is not None and not value >= smallest:  # `not >=`: NaN too
                raise ServingError(f"--{name.replace('_', '-')} must be at least {smallest}, not {value}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ServingError(f"--log-level must be one of debug, info, warning, error, not {self.log_level!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ServingError("--api-key is empty: give a key, or leave the flag out to serve without one")
        self.api_key = self.api_key or os.environ.get(API_KEY_VARIABLE) or None
        if self.continuous_batching and self.attn_implementation == "eager":
            raise ServingError("--attn-implementation eager cannot run with continuous batching (it would switch the "
                               "model to paged attention): use sdpa, or add --no-continuous-batching")
        kind, _, index = self.device.partition(":")
        if kind not in ("auto", "cpu", "cuda", "mps") or (index and not (index.isascii() and index.isdigit())):
            raise ServingError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")
        if kind == "auto":  # the first available
            import torch

            kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        self.device = f"cuda:{index or 0}" if kind == "cuda" else kind

    def batching_config(self):
        """transformers' ContinuousBatchingConfig, or None. On CPU, a paged cache of 5% of the free memory
        (transformers' 80-90% takes seconds to allocate there) and 1024 tokens per forward (its 8192 cost ~1 GB of
        attention masks for a tiny model)."""
        from transformers import ContinuousBatchingConfig

        if not self.continuous_batching:
            return None
        cpu = self.device == "cpu"
        share = self.max_memory_percent or (CPU_CACHE_SHARE if cpu and self.num_blocks is None else None)
        max_batch_tokens = self.max_batch_tokens or (CPU_MAX_BATCH_TOKENS if cpu else None)
        return ContinuousBatchingConfig(max_batch_tokens=max_batch_tokens, max_memory_percent=share,
                                        num_blocks=self.num_blocks)
