"""`diff-transformer serve`'s library: an OpenAI-compatible server for a causal LM (a DiffTransformer, a Llama, ...),
on public interfaces only: a FastAPI app of its own over `generate()` and transformers' continuous batching.

    from modeling_diff_serving import ServeArguments
    from modeling_diff_serving.engine import Engine
    from modeling_diff_serving.server import serve

    arguments = ServeArguments(port=8000)
    serve(Engine.load("path/to/model", arguments), "path/to/model", arguments)

Modules: `config` (the options), `schemas` (the requests, as pydantic models), `engine` (the model: the batch and
generate()), `app` (the FastAPI app and its guards), `server` (uvicorn, exit statuses, the server in a subprocess).
This module imports only `config`, so that the CLI can build its flags without the serving packages installed.
"""

from .config import ServeArguments, ServingError

__all__ = ["ServeArguments", "ServingError"]
