"""`diff-transformer serve`: an OpenAI-compatible server for a model, on transformers' own serving stack.

It runs what `transformers serve` runs (its FastAPI app, its handlers, the model in a process of its own with a
continuous-batching runner and a paged KV cache), loading the model through `AutoModelForCausalLM`: `transformers
serve` finds only the classes built into transformers, so it cannot load a DiffTransformer. What it adds so that no
request can kill, stall or steer it is in `serving.py`: every field checked (HTTP 422), empty and too-long prompts
refused, `max_tokens` fitted to the context, a greedy batch that answers what `generate()` answers (requests that
sample run alone, each with its own settings), `stop` strings, an API key, a body-size limit (HTTP 413).

Endpoints: POST /v1/chat/completions, /v1/completions and /v1/responses (streamed or not), GET /v1/models and
/health; POST /reset and /load_model only with --enable-admin-endpoints. Start-up fails fast, with one `error:` line
and exit status 2: a bad flag or a taken port before the model loads, a paged cache that cannot fit as it loads. If
the model's process or its batching worker dies, the server exits with status 3 (for a supervisor to restart it).
"""

import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import CLIError, resolve_model_path

SERVING_PACKAGES = ("fastapi", "uvicorn", "openai")
CPU_CACHE_SHARE = 0.05  # of the memory left after loading: 1.1 GB on a 24 GB machine (SmolLM2-135M: ~25K tokens)
CPU_MAX_BATCH_TOKENS = 1024
MAX_REQUEST_BYTES = 1024 * 1024
API_KEY_VARIABLE = "DIFF_TRANSFORMER_API_KEY"
LOG_LEVELS = ("debug", "info", "warning", "error")
GRACEFUL_SHUTDOWN_S = 5  # requests still running when the server is stopped (SIGTERM, Ctrl-C) get this long
EXIT_MODEL_DIED = 3
TESTED_TRANSFORMERS = (5, 25)  # the serve extra of pyproject.toml pins it


def add_arguments(parser):
    parser.add_argument("model", help="model to serve: a folder, a Hub id or a .gguf file")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on. The default, 127.0.0.1, takes requests from this machine only; 0.0.0.0 takes "
        "them from every network the machine is on: anyone who can reach the port can then use the model, so set "
        "--api-key (and put TLS in front: the key travels in clear otherwise)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (1-65535)")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` on every endpoint but /health (HTTP 401 otherwise). Default: the "
        f"{API_KEY_VARIABLE} environment variable, else no key",
    )
    parser.add_argument(
        "--enable-admin-endpoints",
        action="store_true",
        help="serve POST /reset (unloads the model until the next request) and /load_model (off: HTTP 404)",
    )
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
        help="attention backend: sdpa (the default), flash_attention_2, ...; eager only with --no-continuous-batching",
    )
    parser.add_argument("--device", default="auto", help="where the model runs: auto, cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="the longest a request may be, prompt and answer, in tokens. Default: the model's context",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="continuous batching: tokens per forward. Default: transformers' (8192) on a GPU, "
        f"{CPU_MAX_BATCH_TOKENS} on CPU",
    )
    parser.add_argument(
        "--max-memory-percent",
        type=float,
        default=None,
        help="continuous batching: the share (0-1] of the memory left after loading that the paged KV cache is sized "
        f"to, at start-up. Default: transformers' (0.8-0.9) on a GPU, {CPU_CACHE_SHARE} on CPU",
    )
    parser.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="continuous batching: the paged KV cache's size in blocks of 256 tokens (instead of a memory share)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=MAX_REQUEST_BYTES,
        help=f"largest request body accepted (HTTP 413 above it); default {MAX_REQUEST_BYTES}",
    )
    parser.add_argument("--log-level", default="warning", help="server log level: debug, info, warning or error")


def check_arguments(args) -> None:
    """Every flag's range, before anything loads (CLIError)."""
    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port must be between 1 and 65535, not {args.port}")
    if args.max_memory_percent is not None and not 0 < args.max_memory_percent <= 1:
        raise CLIError(
            f"--max-memory-percent is a share of the free memory: above 0 and at most 1, not {args.max_memory_percent}"
        )
    for flag, value, smallest in (
        ("--max-batch-tokens", args.max_batch_tokens, 1),
        ("--num-blocks", args.num_blocks, 1),
        ("--max-model-len", args.max_model_len, 2),
        ("--max-request-bytes", args.max_request_bytes, 1024),
    ):
        if value is not None and value < smallest:
            raise CLIError(f"{flag} must be at least {smallest}, not {value}")
    if args.log_level.lower() not in LOG_LEVELS:
        raise CLIError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {args.log_level!r}")
    if args.api_key is not None and not args.api_key.strip():
        raise CLIError("--api-key is empty: give a key, or leave the flag out to serve without one")
    if args.continuous_batching and args.attn_implementation == "eager":
        raise CLIError(
            "--attn-implementation eager cannot run with continuous batching (it would switch the model to paged "
            "attention): use sdpa, or add --no-continuous-batching"
        )
    check_device(args.device)


def check_device(device: str) -> None:
    import torch

    kind, _, index = device.partition(":")
    if device.isdigit():
        kind, index = "cuda", device
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise CLIError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CLIError("--device mps: Apple's MPS is not available here")


def batching_config(args):
    """The continuous-batching settings: the flags, else on CPU a paged cache of 5% of the memory (transformers' 80-90%
    takes seconds to allocate there) and 1024 tokens per forward (transformers' 8192 cost ~1 GB of attention masks
    for a tiny model), else transformers' defaults."""
    import torch
    from transformers import ContinuousBatchingConfig

    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    share = args.max_memory_percent
    if share is None and args.num_blocks is None and on_cpu:
        share = CPU_CACHE_SHARE
    max_batch_tokens = args.max_batch_tokens
    if max_batch_tokens is None and on_cpu:
        max_batch_tokens = CPU_MAX_BATCH_TOKENS
    return ContinuousBatchingConfig(
        max_batch_tokens=max_batch_tokens, max_memory_percent=share, num_blocks=args.num_blocks
    )


def bind_port(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, for the server to use: a taken port is found before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise CLIError(f"--host {host}: {err.strerror}")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise CLIError(
            f"cannot listen on {host}:{port} ({err.strerror}): is another server using it? Choose another --port"
        )
    return sock


def build_server(args, model: str):
    """The model manager (the model loaded, in its own process) and the FastAPI app, on transformers serve."""
    from transformers.cli.serving.utils import GenerationState

    from .serving import ServingModelLoader, ServingModelManager, build_app

    batching = batching_config(args) if args.continuous_batching else None
    generation_state = GenerationState(
        continuous_batching=args.continuous_batching, cb_config=batching, max_model_len=args.max_model_len
    )
    try:  # transformers' own checks of --dtype and --attn-implementation
        loader = ServingModelLoader(
            batching=batching,
            generation_state=generation_state,
            device=args.device,
            dtype=args.dtype,
            attn_implementation=args.attn_implementation,
        )
    except ValueError as err:
        raise CLIError(str(err))
    manager = ServingModelManager(loader, generation_state, force_model=model)  # loads the model
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    app = build_app(manager, generation_state, api_key, args.max_request_bytes, admin=args.enable_admin_endpoints)
    return manager, app


def check_transformers() -> None:
    """serving.py subclasses transformers serve's internals as transformers 5.25 has them: older ones have another
    serving stack, newer ones may have changed (tests/test_serve.py names what did)."""
    import transformers
    from packaging.version import Version

    version = Version(transformers.__version__)
    if version.release[:2] < TESTED_TRANSFORMERS:
        raise CLIError(
            f"diff-transformer serve runs on transformers' serving stack of 5.25, not {version}: "
            "pip install 'transformers[serving]>=5.25,<5.26'"
        )
    if version.release[:2] > TESTED_TRANSFORMERS:
        print(f"note: diff-transformer serve is tested with transformers 5.25, this is {version}", file=sys.stderr)


def run(args) -> int:
    missing = [name for name in SERVING_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise CLIError(f"serving needs {', '.join(missing)}: pip install 'transformers[serving]'")
    check_transformers()
    check_arguments(args)
    sock = bind_port(args.host, args.port)
    try:
        return serve(args, sock)
    finally:
        sock.close()


def serve(args, sock: socket.socket) -> int:
    import uvicorn
    from transformers.cli.serving.utils import set_serve_log_level

    folder, gguf_file = resolve_model_path(args.model)
    # transformers serve names a GGUF file as "folder:file.gguf"
    model = f"{folder}:{gguf_file}" if gguf_file else folder
    level = logging.getLevelName(args.log_level.upper())
    verbose = args.debug or level <= logging.INFO
    # the model's process takes this level as it starts: a failed load then prints our one line, not its traceback
    set_serve_log_level(level if verbose else logging.CRITICAL)
    started = time.perf_counter()
    try:
        manager, app = build_server(args, model)
    except CLIError:
        raise
    except Exception as err:
        if args.debug:
            raise
        raise CLIError(f"cannot load {args.model}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    set_serve_log_level(level)

    name = Path(folder).name if Path(folder).exists() else folder
    batching = "continuous batching" if args.continuous_batching else "one request at a time"
    print(
        f"serving {name} at http://{args.host}:{args.port}/v1 ({batching}; loaded in "
        f"{time.perf_counter() - started:.1f} s). Ctrl-C stops it.",
        flush=True,
    )

    async def stop_if_the_model_died() -> None:
        if manager.is_dead:
            server.should_exit = True

    config = uvicorn.Config(
        app,
        log_level=args.log_level.lower(),
        callback_notify=stop_if_the_model_died,
        timeout_notify=1,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if manager.is_dead:
        reason = next(engine.fatal_error for engine in manager.engines.values() if engine.is_dead)
        print(
            f"error: the model stopped serving ({reason}); exiting for a supervisor to restart the server",
            file=sys.stderr,
        )
        return EXIT_MODEL_DIED
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_background(
    model: str, *flags: str, port: int | None = None, timeout: float = 300, env: dict | None = None
):
    """Run `diff-transformer serve MODEL FLAGS` in a subprocess on 127.0.0.1; yields its base URL once /health answers.

    The server is always stopped on exit. Raises RuntimeError (with the server's output) if it exits or does not
    answer within `timeout` seconds. For scripts and tests that need a live server (`start_server` also yields the
    process).
    """
    with start_server(model, *flags, port=port, timeout=timeout, env=env) as (base, _process):
        yield base


@contextlib.contextmanager
def start_server(model: str, *flags: str, port: int | None = None, timeout: float = 300, env: dict | None = None):
    """Like `serve_in_background`, yielding (base URL, the server's subprocess.Popen). The server's output goes to a
    temporary file, `read_output(process)` reads it (a pipe nobody reads would stop a server that logs much)."""
    import httpx2 as httpx

    port = port or free_port()
    output = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_diff_cli.main", "serve", str(model), "--port", str(port), *flags],
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    process.output = output
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{read_output(process)[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")
            time.sleep(0.1)
        yield base, process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()


def read_output(process: subprocess.Popen) -> str:
    """What a server `start_server` started has printed so far."""
    process.output.flush()
    process.output.seek(0)
    return process.output.read()
