"""`diff-transformer serve`: an OpenAI-compatible server for a model (the library: modeling_diff_serving).

Endpoints: POST /v1/chat/completions, /v1/completions and /v1/responses (streamed or not), GET /v1/models and
/health. Greedy requests are batched with transformers' continuous batching and answer exactly what generate()
answers; any other runs alone with generate() and its own settings. A bad flag or a taken port exits with status 2
before the model loads; if the model's batch dies, the server exits with status 3. Details: docs/serving.md.
"""

import importlib.util
from dataclasses import fields
from pathlib import Path

from modeling_diff_conversion import resolve_model_path
from modeling_diff_serving import ServeArguments, ServingError

from .common import CLIError

ARGUMENT_CLASSES = (ServeArguments,)  # main.py makes a flag of each field (--port, --no-continuous-batching, ...)


def add_arguments(parser):
    parser.add_argument("model", help="model to serve: a folder, a Hub id or a .gguf file")


def run(args) -> int:
    if missing := [name for name in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(name) is None]:
        raise CLIError(f"serving needs {', '.join(missing)}: pip install 'modeling-diff[serve]'")
    from modeling_diff_serving.engine import Engine
    from modeling_diff_serving.server import GRACEFUL_SHUTDOWN_S, bind, serve

    try:
        arguments = ServeArguments(**{option.name: getattr(args, option.name) for option in fields(ServeArguments)})
        with bind(arguments.host, arguments.port) as sock:  # a taken port fails before the model loads
            folder, gguf_file = resolve_model_path(args.model)
            engine = Engine.load(str(Path(folder) / gguf_file) if gguf_file else folder, arguments, name=args.model)
            return serve(engine, args.model, arguments, sock)
    except ServingError as err:
        raise CLIError(str(err)) from err
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the server stopped; requests still running had {GRACEFUL_SHUTDOWN_S} s to end")
