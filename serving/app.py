"""The OpenAI-compatible app: FastAPI routes over an `Engine`, and the ASGI middlewares that guard them (`ApiKey`,
`BodyLimits`). Every refusal is a 4xx with one sentence in `detail` (and OpenAI's `error.message`)."""

import asyncio
import hmac
import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import Headers

from .engine import Answer, Engine, ModelStopped
from .schemas import ChatRequest, CompletionRequest, ResponseRequest, problem

DEFAULT_MAX_TOKENS = 1024  # without max_tokens, capped to what the context leaves (transformers serve's default)
logger = logging.getLogger("modeling_diff_serving")


class Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"detail": detail, "error": {"message": detail, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def build_app(engine: Engine, name: str, api_key: str | None = None, max_request_bytes: int = 2**20,
              request_timeout: float = 30.0) -> FastAPI:  # fmt: skip
    """The app serving `engine`'s model as `name` (the model as the user named it: a folder, a Hub id, a .gguf)."""
    app = FastAPI(title="diff-transformer serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    names = {name, name.rstrip("/")}
    path = os.path.realpath(name) if os.path.exists(name) else None

    def serves(model: str | None) -> bool:
        """The model a request names: the name the server was given, with or without a trailing slash, or any path to
        the same folder or file."""
        if model is None or model in names:
            return True
        try:
            return path is not None and "\0" not in model and os.path.realpath(os.path.expanduser(model)) == path
        except (OSError, ValueError):
            return False

    async def respond(request: Request, endpoint: "Endpoint"):
        try:
            try:
                body = endpoint.schema.model_validate_json(
                    await request.body(), context={"vocab_size": engine.vocab_size}
                )
            except ValidationError as invalid:
                raise Refused(422, problem(invalid))
            if not serves(body.model):
                raise Refused(400, f"This server serves {name.rstrip('/')!r}, not {body.model[:200]!r}.")
            prompt = await asyncio.to_thread(endpoint.prompt, engine.tokenizer, body)
            answer = engine.answer(prompt, body.settings(), fit(engine, prompt, body.max_tokens_asked), body.stop)
            reply = endpoint(name.rstrip("/"), created, len(prompt), answer)
            if body.stream:
                usage = body.stream_options is not None and body.stream_options.include_usage
                return StreamingResponse(reply.stream(usage), media_type="text/event-stream")
            text = await unless_the_client_leaves(request, reply.text())
            return Response(status_code=499) if text is None else reply.whole(text)
        except Refused as refused:
            return error(refused.status, refused.detail)
        except ModelStopped as stopped:
            return error(503, f"The model stopped serving ({stopped}); the server is exiting.")
        except Exception as failure:  # a fault of the server or the model, not of the request
            logger.error("%s %s failed: %s", request.method, request.url.path, first_line(failure))
            logger.debug("traceback", exc_info=True)
            return error(500, f"The model failed on this request ({first_line(failure)}).")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if engine.alive:
            return {"status": "ok"}
        return error(503, f"The model stopped serving ({engine.failure or 'its batch stopped'}).")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": name.rstrip("/"), "object": "model", "created": created, "owned_by": "diff-transformer"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, ChatCompletion)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, Completion)

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await respond(request, ModelResponse)

    app.add_middleware(BodyLimits, max_bytes=max_request_bytes, timeout=request_timeout)
    if api_key is not None:  # outside BodyLimits: a request without the key is refused before its body is read
        app.add_middleware(ApiKey, api_key=api_key)
    return app


def fit(engine: Engine, prompt: list[int], asked: int | None) -> int:
    """The request's max_new_tokens: what it asked for, else DEFAULT_MAX_TOKENS, within what the context leaves."""
    if not prompt:
        raise Refused(422, "The prompt is empty: give at least one token of text.")
    room = engine.context_length - len(prompt)
    if room < 1:
        raise Refused(
            400, f"The prompt has {len(prompt)} tokens, but the model's context holds {engine.context_length}."
        )
    if asked is not None and asked > room:
        raise Refused(
            400,
            f"The request asks for {asked} new tokens, but its prompt of {len(prompt)} tokens leaves room for {room} "
            f"in the model's context of {engine.context_length}.",
        )
    return asked or min(DEFAULT_MAX_TOKENS, room)


async def unless_the_client_leaves(request: Request, work):
    """`await work`, or None once the client has left (which cancels the work and so its generation)."""

    async def client_left():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(work), asyncio.ensure_future(client_left())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return tasks[0].result() if tasks[0].done() else None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------------------------------
# The endpoints: how each renders its prompt, and writes its answer whole or as server-sent events.


def chat_prompt(tokenizer, body) -> list[int]:
    if tokenizer.chat_template is None:
        raise Refused(400, "This model has no chat template: send plain text to /v1/completions.")
    try:  # the template is the model's, the variables the request's: what fails is the request's
        encoded = tokenizer.apply_chat_template(
            body.conversation(),
            tools=body.tool_schemas(),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(getattr(body, "chat_template_kwargs", None) or {}),
        )
    except Exception as failure:
        raise Refused(422, f"The chat template cannot render these messages ({first_line(failure)}).")
    return list(encoded["input_ids"])


class Endpoint:
    """One answer of an endpoint: `whole()` its JSON, `stream()` its events."""

    schema: type
    done_event = "data: [DONE]\n\n"

    def __init__(self, model: str, created: int, prompt_tokens: int, answer: Answer):
        self.model, self.created, self.prompt_tokens, self.answer = model, created, prompt_tokens, answer
        self.id = uuid.uuid4().hex

    @staticmethod
    def prompt(tokenizer, body) -> list[int]:
        return chat_prompt(tokenizer, body)

    async def text(self) -> str:
        return "".join([piece async for piece in self.answer])

    def usage(self) -> dict:
        completion = self.answer.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    async def stream(self, usage: bool):
        try:
            for event in self.first_events():
                yield event
            async for piece in self.answer:
                yield self.event(self.delta(piece))
            for event in self.last_events(usage):
                yield event
        except Exception as failure:
            status = 503 if isinstance(failure, ModelStopped) else 500
            yield self.event({"error": {"message": first_line(failure), "type": "server_error", "code": status}})
        yield self.done_event

    @staticmethod
    def event(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ChatCompletion(Endpoint):
    schema = ChatRequest

    def chunk(self, delta: dict, finish_reason=None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"id": f"chatcmpl-{self.id}", "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [choice]}  # fmt: skip

    def whole(self, text: str) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": self.answer.finish_reason, "logprobs": None}
        return {"id": f"chatcmpl-{self.id}", "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}  # fmt: skip

    def first_events(self):
        return [self.event(self.chunk({"role": "assistant", "content": ""}))]

    def delta(self, piece: str) -> dict:
        return self.chunk({"content": piece})

    def last_events(self, usage: bool):
        events = [self.event(self.chunk({}, self.answer.finish_reason))]
        if usage:
            events.append(self.event({**self.chunk({}), "choices": [], "usage": self.usage()}))
        return events


class Completion(ChatCompletion):
    schema = CompletionRequest

    @staticmethod
    def prompt(tokenizer, body) -> list[int]:
        return list(tokenizer(body.prompt)["input_ids"])

    def chunk(self, delta: dict, finish_reason=None) -> dict:
        choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish_reason, "logprobs": None}
        return {"id": f"cmpl-{self.id}", "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}  # fmt: skip

    def whole(self, text: str) -> dict:
        return {**self.chunk({"content": text}, self.answer.finish_reason), "usage": self.usage()}

    def first_events(self):
        return []


class ModelResponse(Endpoint):
    """The Responses API: its events carry their type, and its stream ends with `response.completed`, no [DONE]."""

    schema = ResponseRequest
    done_event = ""

    def response(self, text: str | None) -> dict:
        """The response object: in progress (text None), or done."""
        response = {"id": f"resp_{self.id}", "object": "response", "created_at": self.created, "model": self.model,
                    "status": "in_progress", "output": [], "incomplete_details": None}  # fmt: skip
        if text is not None:
            limited = self.answer.finish_reason == "length"
            usage = self.usage()
            response.update(
                status="incomplete" if limited else "completed",
                incomplete_details={"reason": "max_output_tokens"} if limited else None,
                output=[self.item(text)],
                output_text=text,
                usage={"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                       "total_tokens": usage["total_tokens"]},
            )  # fmt: skip
        return response

    def item(self, text: str | None) -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
        return {"type": "message", "id": f"msg_{self.id}", "role": "assistant", "content": content,
                "status": "in_progress" if text is None else "completed"}  # fmt: skip

    def whole(self, text: str) -> dict:
        return self.response(text)

    def event(self, data: dict) -> str:
        self.sequence = getattr(self, "sequence", -1) + 1
        data = {**data, "sequence_number": self.sequence}
        return f"event: {data.get('type', 'error')}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def first_events(self):
        self.pieces = []
        part = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": f"msg_{self.id}", "output_index": 0, "content_index": 0}
        return [
            self.event({"type": "response.created", "response": self.response(None)}),
            self.event({"type": "response.output_item.added", "output_index": 0, "item": self.item(None)}),
            self.event({"type": "response.content_part.added", **where, "part": part}),
        ]

    def delta(self, piece: str) -> dict:
        self.pieces.append(piece)
        return {"type": "response.output_text.delta", "item_id": f"msg_{self.id}", "output_index": 0,
                "content_index": 0, "delta": piece}  # fmt: skip

    def last_events(self, usage: bool):
        text = "".join(self.pieces)
        part = {"type": "output_text", "text": text, "annotations": []}
        where = {"item_id": f"msg_{self.id}", "output_index": 0, "content_index": 0}
        return [
            self.event({"type": "response.output_text.done", **where, "text": text}),
            self.event({"type": "response.content_part.done", **where, "part": part}),
            self.event({"type": "response.output_item.done", "output_index": 0, "item": self.item(text)}),
            self.event({"type": "response.completed", "response": self.response(text)}),
        ]


# ---------------------------------------------------------------------------------------------------------------------
# ASGI middlewares


class ApiKey:
    """HTTP 401, before anything else runs, for a request without `Authorization: Bearer KEY` (the scheme's case
    does not matter; the key is compared in constant time), on every route but /health."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.key):
                detail = "Missing or wrong API key: send the header `Authorization: Bearer KEY`."
                return await error(401, detail, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimits:
    """Reads each request's body before the app does: HTTP 413 for one over `max_bytes` (at once when its
    Content-Length says so), 408 for one that has not arrived `timeout` seconds after its head."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes.")
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + self.timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                detail = f"The request body did not arrive within {self.timeout:g} s."
                return await error(408, detail)(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay_then_receive():
            nonlocal replayed
            if replayed:
                return await receive()  # the client leaving
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay_then_receive, send)
