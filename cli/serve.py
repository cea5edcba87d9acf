"""`diff-transformer serve`: an OpenAI-compatible server for a model, on transformers' own serving stack.

It runs what `transformers serve` runs (its FastAPI app, its chat-completion and completion handlers, its
continuous-batching manager with the paged KV cache) with one difference: the model is loaded through
`AutoModelForCausalLM`. `transformers serve` picks the class with `getattr(transformers, architectures[0])`, which
finds only classes built into transformers, so it cannot load a DiffTransformer (nor any model with remote code).

Endpoints: POST /v1/chat/completions (streamed or not), POST /v1/completions, GET /v1/models, GET /health.
Continuous batching is on by default; greedy requests (temperature 0) answer what `generate()` answers.
"""

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

from .common import CLIError, resolve_model_path

SERVING_PACKAGES = ("fastapi", "uvicorn", "openai")
CPU_CACHE_SHARE = 0.05  # of the free RAM: 1.2 GB on a 24 GB machine, ~26K tokens of SmolLM2-135M's KV cache


def add_arguments(parser):
    parser.add_argument("model", help="model to serve: a folder, a Hub id or a .gguf file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--no-continuous-batching",
        dest="continuous_batching",
        action="store_false",
        help="answer requests one at a time with generate() instead of continuous batching with a paged cache",
    )
    parser.add_argument("--dtype", default="auto", help="weights dtype: auto (as saved), float32, bfloat16 or float16")
    parser.add_argument(
        "--attn-implementation",
        default=None,
        help="attention backend: sdpa (the default), eager, flash_attention_2, ...",
    )
    parser.add_argument("--device", default="auto", help="where the model runs: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="continuous batching: tokens per forward")
    parser.add_argument(
        "--max-memory-percent",
        type=float,
        default=None,
        help="continuous batching: the share of free memory the paged KV cache is sized to (0-1). Default: "
        f"transformers' (0.6-0.9) on a GPU, {CPU_CACHE_SHARE} on CPU, where sizing a cache to most of the RAM "
        "delays the first answer by seconds",
    )
    parser.add_argument("--log-level", default="warning", help="server log level: debug, info, warning or error")


ROLES = ("system", "developer", "user", "assistant", "tool")
NUMBERS = {  # field: (type, smallest, largest)
    "max_tokens": (int, 1, None),
    "max_completion_tokens": (int, 1, None),
    "temperature": ((int, float), 0, 2),
    "top_p": ((int, float), 0, 1),
    "seed": (int, None, None),
}


def chat_request_problem(body: dict) -> str | None:
    """What is wrong with a chat-completion request, in one sentence, or None when it is well formed.

    transformers' handler checks the field names; these checks catch wrong types and values, which would otherwise
    fail inside generation with an HTTP 500.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{i}] must be an object whose `role` is one of {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, (str, list)) and not (content is None and message["role"] == "assistant"):
            return f"messages[{i}].content must be a string or a list of content parts"
    for field, (kind, low, high) in NUMBERS.items():
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"`{field}` must be a number" if kind is not int else f"`{field}` must be an integer"
        if (low is not None and value < low) or (high is not None and value > high):
            return f"`{field}` must be between {low} and {high}" if high is not None else f"`{field}` must be >= {low}"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "`stream` must be true or false"
    return None


def build_chat_handler_class():
    """transformers serve's chat handler, refusing malformed requests with HTTP 422 and a message."""
    from fastapi import HTTPException
    from transformers.cli.serving.chat_completion import ChatCompletionHandler

    class CheckedChatCompletionHandler(ChatCompletionHandler):
        def _validate_request(self, body: dict) -> None:
            super()._validate_request(body)
            problem = chat_request_problem(body)
            if problem is not None:
                raise HTTPException(status_code=422, detail=problem)

    return CheckedChatCompletionHandler


def build_model_manager_class():
    """`transformers serve`'s ModelManager, loading through AutoModelForCausalLM (see the module docstring)."""
    from transformers import AutoModelForCausalLM
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import split_revision

    import modeling_diff  # noqa: F401  (registers diff_transformer with the Auto classes)

    class AutoModelManager(ModelManager):
        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            model_id, revision = split_revision(model_id_and_revision)
            kwargs = dict(
                revision=revision,
                attn_implementation=self.attn_implementation,
                dtype=self.dtype,
                device_map=self.device,
                trust_remote_code=self.trust_remote_code,
                tqdm_class=tqdm_class,
            )
            if gguf_file is not None:
                kwargs["gguf_file"] = gguf_file
            return AutoModelForCausalLM.from_pretrained(model_id, **kwargs)

    return AutoModelManager


def build_app(model: str, args):
    """The FastAPI app of `transformers serve` with `model` loaded (loading errors raise here, before serving)."""
    from transformers import ContinuousBatchingConfig
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    manager = build_model_manager_class()(
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        continuous_batching=args.continuous_batching,
        force_model=model,  # loaded now, never unloaded
    )
    import torch

    share = args.max_memory_percent
    if share is None and (args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())):
        share = CPU_CACHE_SHARE
    cb_config = ContinuousBatchingConfig(max_batch_tokens=args.max_batch_tokens, max_memory_percent=share)
    state = GenerationState(continuous_batching=args.continuous_batching, cb_config=cb_config)
    return build_server(
        manager,
        build_chat_handler_class()(model_manager=manager, generation_state=state),
        completion_handler=CompletionHandler(model_manager=manager, generation_state=state),
        response_handler=ResponseHandler(model_manager=manager, generation_state=state),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state),
        generation_state=state,
    )


def run(args) -> int:
    missing = [name for name in SERVING_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise CLIError(f"serving needs {', '.join(missing)}: pip install 'transformers[serving]'")
    folder, gguf_file = resolve_model_path(args.model)
    # transformers serve names a GGUF file as "folder:file.gguf"
    model = f"{folder}:{gguf_file}" if gguf_file else folder
    started = time.perf_counter()
    try:
        app = build_app(model, args)
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise CLIError(f"cannot load {args.model}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")

    import uvicorn

    name = Path(folder).name if Path(folder).exists() else folder
    batching = "continuous batching" if args.continuous_batching else "one request at a time"
    print(
        f"serving {name} at http://{args.host}:{args.port}/v1 ({batching}; loaded in "
        f"{time.perf_counter() - started:.1f} s). Ctrl-C stops it.",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_background(model: str, *flags: str, port: int | None = None, timeout: float = 300):
    """Run `diff-transformer serve MODEL FLAGS` in a subprocess on 127.0.0.1; yields its base URL once /health answers.

    The server is always stopped on exit. Raises RuntimeError (with the server's output) if it exits or does not
    answer within `timeout` seconds. For scripts and tests that need a live server.
    """
    import httpx2 as httpx

    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_diff_cli.main", "serve", str(model), "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{process.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
