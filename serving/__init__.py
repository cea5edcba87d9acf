"""`diff-transformer serve`'s library: an OpenAI-compatible server for a causal LM, a FastAPI app of its own over
`generate()` and transformers' public continuous batching. Modules: `config` (the options), `schemas` (the requests),
`engine` (the model), `app` (the FastAPI app), `server` (uvicorn and exit statuses). This module imports only `config`,
so that the CLI builds its flags without the serving packages installed.

    arguments = ServeArguments(port=8000)
    serve(Engine.load("path/to/model", arguments), "path/to/model", arguments)  # engine.Engine, server.serve
"""

from .config import ServeArguments, ServingError

__all__ = ["ServeArguments", "ServingError"]
