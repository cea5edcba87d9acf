"""What `serve` is told: its options (a dataclass that HfArgumentParser turns into flags), checked before anything
loads."""

import os
from dataclasses import dataclass, field

API_KEY_VARIABLE = "DIFF_TRANSFORMER_API_KEY"
LOG_LEVELS = ("debug", "info", "warning", "error")
CPU_CACHE_SHARE = 0.05  # of the memory left after loading: 1.1 GB on a 24 GB machine (SmolLM2-135M: ~25K tokens)
CPU_MAX_BATCH_TOKENS = 1024


class ServingError(ValueError):
    """Bad input to the server (an option, a model that cannot load or be batched): one sentence saying what to do."""


@dataclass
class ServeArguments:
    """The server's options. `diff-transformer serve` has a flag for each (`--max-model-len`, ...)."""

    host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "address to listen on. 127.0.0.1 takes requests from this machine only; 0.0.0.0 from every network "
            "the machine is on: then set an API key, and put TLS in front (the key travels in clear otherwise)"
        },
    )
    port: int = field(default=8000, metadata={"help": "port to listen on (1-65535)"})
    api_key: str | None = field(
        default=None,
        metadata={
            "help": f"require `Authorization: Bearer KEY` on every endpoint but /health (HTTP 401 otherwise). Default: "
            f"the {API_KEY_VARIABLE} environment variable (better: a command line shows in `ps`), else no key"
        },
    )
    continuous_batching: bool = field(
        default=True,
        metadata={
            "help": "batch greedy requests with transformers' continuous batching (a paged KV cache); "
            "--no-continuous-batching answers every request with generate(), one at a time"
        },
    )
    dtype: str = field(default="auto", metadata={"help": "weights dtype: auto (as saved), float32, bfloat16, float16"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "attention backend: sdpa (the default), flash_attention_2, eager, ..."}
    )
    device: str = field(default="auto", metadata={"help": "where the model runs: auto, cpu, cuda, cuda:1, mps"})
    max_model_len: int | None = field(
        default=None, metadata={"help": "the longest a request may be, prompt and answer, in tokens (default: the context)"}
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata={"help": f"tokens per batched forward (default: transformers' on a GPU, {CPU_MAX_BATCH_TOKENS} on CPU)"},
    )
    max_memory_percent: float | None = field(
        default=None,
        metadata={
            "help": "share (0-1] of the memory left after loading that the paged KV cache takes (default: "
            f"transformers' on a GPU, {CPU_CACHE_SHARE} on CPU)"
        },
    )
    num_blocks: int | None = field(
        default=None, metadata={"help": "the paged KV cache's size in blocks of 256 tokens, instead of a memory share"}
    )
    max_request_bytes: int = field(
        default=1024 * 1024, metadata={"help": "largest request body accepted (HTTP 413 above it)"}
    )
    request_timeout: float = field(
        default=30.0,
        metadata={
            "help": "seconds a client has to send a request's head, and then its body, before its connection is "
            "dropped (HTTP 408 for a body)"
        },
    )
    log_level: str = field(default="warning", metadata={"help": "server log level: debug, info, warning or error"})

    def __post_init__(self):
        """Every option's range, before anything loads (ServingError)."""
        if not 1 <= self.port <= 65535:
            raise ServingError(f"--port must be between 1 and 65535, not {self.port}")
        if self.max_memory_percent is not None and not 0 < self.max_memory_percent <= 1:
            raise ServingError(f"--max-memory-percent must be above 0 and at most 1, not {self.max_memory_percent}")
        for flag, value, smallest in (
            ("--max-batch-tokens", self.max_batch_tokens, 1),
            ("--num-blocks", self.num_blocks, 1),
            ("--max-model-len", self.max_model_len, 2),
            ("--max-request-bytes", self.max_request_bytes, 1024),
            ("--request-timeout", self.request_timeout, 0.1),
        ):
            if value is not None and not value >= smallest:  # `not >=`: NaN too
                raise ServingError(f"{flag} must be at least {smallest}, not {value}")
        self.log_level = self.log_level.lower()
        if self.log_level not in LOG_LEVELS:
            raise ServingError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_VARIABLE) or None
        elif not self.api_key.strip():
            raise ServingError("--api-key is empty: give a key, or leave the flag out to serve without one")
        if self.continuous_batching and self.attn_implementation == "eager":
            raise ServingError(
                "--attn-implementation eager cannot run with continuous batching (it would switch the model to paged "
                "attention): use sdpa, or add --no-continuous-batching"
            )
        self.device = resolve_device(self.device)

    def batching_config(self):
        """transformers' ContinuousBatchingConfig from the flags; on CPU a paged cache of 5% of the free memory
        (transformers' 80-90% takes seconds to allocate there) and 1024 tokens per forward (its 8192 cost ~1 GB of
        attention masks for a tiny model). None without continuous batching."""
        from transformers import ContinuousBatchingConfig

        if not self.continuous_batching:
            return None
        on_cpu = self.device == "cpu"
        share = self.max_memory_percent
        if share is None and self.num_blocks is None and on_cpu:
            share = CPU_CACHE_SHARE
        max_batch_tokens = self.max_batch_tokens or (CPU_MAX_BATCH_TOKENS if on_cpu else None)
        return ContinuousBatchingConfig(
            max_batch_tokens=max_batch_tokens, max_memory_percent=share, num_blocks=self.num_blocks
        )


def resolve_device(device: str) -> str:
    """cpu, cuda:N or mps for --device (auto: the first that is available), or ServingError."""
    import torch

    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and not (index.isascii() and index.isdigit())):
        raise ServingError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {device!r}")
    if kind == "auto":
        return "cuda:0" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda" and int(index or 0) >= torch.cuda.device_count():
        raise ServingError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ServingError("--device mps: Apple's MPS is not available here")
    return f"cuda:{index or 0}" if kind == "cuda" else kind
