"""The OpenAI-compatible FastAPI app over an `Engine`. Every refusal is a 4xx with one sentence in `detail` (and in
OpenAI's `error.message`)."""

import asyncio
import hmac
import json
import logging
import os
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from .config import ServeArguments
from .engine import Answer, Engine, ModelStopped
from .schemas import ChatRequest, CompletionRequest, ResponseRequest, problem

DEFAULT_MAX_TOKENS = 1024  # without max_tokens (transformers serve's default), within what the context leaves
logger = logging.getLogger("modeling_diff_serving")


class APIError(Exception):
    """An answer of HTTP `status` with one sentence."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers

    def response(self) -> JSONResponse:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        body = {"detail": self.detail, "error": {"message": self.detail, "type": kind, "code": self.status}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def build_app(engine: Engine, name: str, arguments: ServeArguments) -> FastAPI:
    """The app serving `engine`'s model as `name` (the model as the server was given it: a folder, a Hub id, a
    .gguf); a request may name it so, without a trailing slash, or by any path to it or to the folder it was loaded
    from (a Hub id's snapshot, an import)."""
    key = arguments.api_key.encode() if arguments.api_key is not None else None
    created, served = int(time.time()), name.rstrip("/")
    paths = {os.path.realpath(where) for where in (name, engine.source) if where and os.path.exists(where)}

    async def authorized(request: Request) -> None:
        """Every route but /health needs `Authorization: Bearer KEY` (the scheme in any case, the key compared in
        constant time), checked before the body is read."""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if key is not None and request.url.path != "/health" and not (
            scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), key)
        ):
            raise APIError(401, "Missing or wrong API key: send the header `Authorization: Bearer KEY`.",
                           {"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="diff-transformer serve", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(authorized)])
    app.add_exception_handler(APIError, lambda request, error: error.response())

    def serves(model: str | None) -> bool:
        if model is None or model in (name, served):
            return True
        try:  # PATH_MAX; a NUL byte is a ValueError
            return len(model) <= 4096 and os.path.realpath(os.path.expanduser(model)) in paths
        except (OSError, ValueError):
            return False

    def prepared(schema, raw: bytes):
        """The request checked, and its prompt's token ids (in a thread: a body of a megabyte takes a while)."""
        try:
            body = schema.model_validate_json(raw, context={"vocab_size": engine.vocab_size})
        except ValidationError as invalid:
            raise APIError(422, problem(invalid))
        if not serves(body.model):
            raise APIError(400, f"This server serves {served!r}, not {body.model[:200]!r}.")
        if isinstance(body, CompletionRequest):
            return body, engine.tokenizer(body.prompt)["input_ids"]
        if engine.tokenizer.chat_template is None:
            raise APIError(400, "This model has no chat template: send plain text to /v1/completions.")
        try:  # the template is the model's, its variables the request's: what fails is the request's
            return body, engine.tokenizer.apply_chat_template(
                body.conversation(), add_generation_prompt=True, return_dict=True,
                **(getattr(body, "chat_template_kwargs", None) or {}),
            )["input_ids"]
        except Exception as failure:
            raise APIError(422, f"The chat template cannot render these messages ({first_line(failure)}).")

    def endpoint(schema, reply_class):
        async def respond(request: Request):
            try:
                raw = await read_body(request, arguments.max_request_bytes, arguments.request_timeout)
                body, prompt = await asyncio.to_thread(prepared, schema, raw)
                answer = engine.answer(prompt, body.settings(), fit(engine, prompt, body.max_new_tokens()), body.stop)
                reply = reply_class(served, created, len(prompt), answer)
                if body.stream:
                    usage = (body.stream_options or {}).get("include_usage", False)
                    return StreamingResponse(reply.events(usage), media_type="text/event-stream")
                text = await unless_the_client_leaves(request, reply.answer.text())
                return Response(status_code=499) if text is None else reply.whole(text)
            except APIError as error:
                return error.response()
            except ModelStopped as stopped:
                return APIError(503, f"The model stopped serving ({stopped}); the server is exiting.").response()
            except Exception as failure:  # a fault of the server or the model, not of the request
                debug = logger.isEnabledFor(logging.DEBUG)
                logger.error("%s failed: %s", request.url.path, first_line(failure), exc_info=debug)
                return APIError(500, f"The model failed on this request ({first_line(failure)}).").response()

        return respond

    app.post("/v1/chat/completions")(endpoint(ChatRequest, ChatReply))
    app.post("/v1/completions")(endpoint(CompletionRequest, CompletionReply))
    app.post("/v1/responses")(endpoint(ResponseRequest, ResponsesReply))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if engine.alive:
            return {"status": "ok"}
        return APIError(503, f"The model stopped serving ({engine.failure or 'its batch stopped'}).").response()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": created, "owned_by": "user"}]}

    return app


async def read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The request's body: HTTP 413 when it is larger than `max_bytes` (at once when its Content-Length says so),
    408 when it has not arrived within `timeout` seconds."""
    too_large = APIError(413, f"The request body is larger than this server's limit of {max_bytes} bytes.")
    if (length := request.headers.get("content-length", "")).isdigit() and int(length) > max_bytes:
        raise too_large

    async def whole_body() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
        return bytes(body)

    try:
        return await asyncio.wait_for(whole_body(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout:g} s.")
    except ClientDisconnect:
        raise APIError(400, "The client left before its request's body arrived.")  # read by no one


def fit(engine: Engine, prompt: list[int], asked: int | None) -> int:
    """The request's max_new_tokens: what it asked for, else DEFAULT_MAX_TOKENS, within what the context leaves."""
    if not prompt:
        raise APIError(422, "The prompt is empty: give at least one token of text.")
    room, context = engine.context_length - len(prompt), engine.context_length
    if room < 1:
        raise APIError(400, f"The prompt has {len(prompt)} tokens, but the model's context holds {context}.")
    if asked is not None and asked > room:
        raise APIError(400, f"The request asks for {asked} new tokens, but its prompt of {len(prompt)} tokens leaves "
                       f"room for {room} in the model's context of {context}.")
    return asked or min(DEFAULT_MAX_TOKENS, room)


async def unless_the_client_leaves(request: Request, work):
    """`await work`, or None once the client has left (which cancels the work, and so its generation)."""

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


class CompletionReply:
    """An answer as /v1/completions writes it: `whole()`, or `events()` for a stream (server-sent events, ending with
    `data: [DONE]`); the other endpoints' replies change what it writes."""

    object, chunk_object, id_prefix, done = "text_completion", "text_completion", "cmpl-", "data: [DONE]\n\n"

    def __init__(self, model: str, created: int, prompt_tokens: int, answer: Answer):
        self.model, self.created, self.prompt_tokens, self.answer = model, created, prompt_tokens, answer
        self.id = self.id_prefix + uuid.uuid4().hex

    def usage(self) -> dict:
        prompt, done = self.prompt_tokens, self.answer.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def reply(self, object: str, choice: dict | None, finish_reason=None, **extra) -> dict:
        choices = [] if choice is None else [{"index": 0, **choice, "finish_reason": finish_reason, "logprobs": None}]
        return {"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def piece(self, text: str | None) -> dict:
        return {"text": text or ""}

    def whole(self, text: str) -> dict:
        return self.reply(self.object, self.piece(text), self.answer.finish_reason, usage=self.usage())

    async def stream(self, usage: bool):
        async for text in self.answer:
            yield self.reply(self.chunk_object, self.piece(text))
        yield self.reply(self.chunk_object, self.piece(None), self.answer.finish_reason)
        if usage:
            yield self.reply(self.chunk_object, None, usage=self.usage())

    def event(self, data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, usage: bool):
        """The stream as server-sent events; a failure ends it with an error event."""
        try:
            async for data in self.stream(usage):
                yield self.event(data)
        except Exception as failure:
            status = 503 if isinstance(failure, ModelStopped) else 500
            error = {"message": first_line(failure), "type": "server_error", "code": status}
            yield self.event({"type": "error", "error": error})
        if self.done:
            yield self.done


class ChatReply(CompletionReply):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def piece(self, text: str | None) -> dict:
        return {"delta": {} if text is None else {"content": text}}

    def whole(self, text: str) -> dict:
        choice = {"message": {"role": "assistant", "content": text}}
        return self.reply(self.object, choice, self.answer.finish_reason, usage=self.usage())

    async def stream(self, usage: bool):
        yield self.reply(self.chunk_object, {"delta": {"role": "assistant", "content": ""}})
        async for data in super().stream(usage):
            yield data


class ResponsesReply(CompletionReply):
    """The Responses API: typed events, the last `response.completed` (no [DONE], as OpenAI's)."""

    id_prefix, done = "resp_", ""

    def whole(self, text: str | None) -> dict:
        """The response, in progress (text None) or done: complete, or cut at its max_output_tokens."""
        response = {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
                    "status": "in_progress", "output": [], "incomplete_details": None}
        if text is not None:
            cut, usage = self.answer.finish_reason == "length", self.usage()
            response.update(status="incomplete" if cut else "completed", output=[self.item(text)], output_text=text,
                            incomplete_details={"reason": "max_output_tokens"} if cut else None,
                            usage={"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                                   "total_tokens": usage["total_tokens"]})
        return response

    def item(self, text: str | None) -> dict:
        return {"type": "message", "id": "msg_" + self.id, "role": "assistant",
                "content": [] if text is None else [{"type": "output_text", "text": text, "annotations": []}],
                "status": "in_progress" if text is None else "completed"}

    async def stream(self, usage: bool):
        where, pieces = {"item_id": "msg_" + self.id, "output_index": 0, "content_index": 0}, []
        yield {"type": "response.created", "response": self.whole(None)}
        yield {"type": "response.output_item.added", "output_index": 0, "item": self.item(None)}
        yield {"type": "response.content_part.added", **where, "part": {"type": "output_text", "text": ""}}
        async for piece in self.answer:
            pieces.append(piece)
            yield {"type": "response.output_text.delta", **where, "delta": piece}
        text = "".join(pieces)
        yield {"type": "response.output_text.done", **where, "text": text}
        yield {"type": "response.content_part.done", **where, "part": self.item(text)["content"][0]}
        yield {"type": "response.output_item.done", "output_index": 0, "item": self.item(text)}
        yield {"type": "response.completed", "response": self.whole(text)}

    def event(self, data: dict) -> str:
        self.sequence = getattr(self, "sequence", -1) + 1
        data = {**data, "sequence_number": self.sequence}
        return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
