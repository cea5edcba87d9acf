"""The OpenAI-compatible FastAPI app over an `Engine`. Every refusal is a 4xx with one sentence in `detail` (and in
OpenAI's `error.message`)."""

import asyncio
import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .engine import Answer, Engine, ModelStopped
from .schemas import ChatRequest, CompletionRequest, ResponseRequest, problem

DEFAULT_MAX_TOKENS = 1024  # without max_tokens (transformers serve's default), within what the context leaves
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
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def build_app(engine: Engine, name: str) -> FastAPI:
    """The app serving `engine`'s model as `name` (the model as the server was given it: a folder, a Hub id, a
    .gguf); a request may name it so, without a trailing slash, or by any path to it or to the folder it was loaded
    from (a Hub id's snapshot, an import)."""
    app = FastAPI(title="diff-transformer serve", docs_url=None, redoc_url=None, openapi_url=None)
    created, served = int(time.time()), name.rstrip("/")
    paths = {os.path.realpath(where) for where in (name, engine.source) if where and os.path.exists(where)}

    def serves(model: str | None) -> bool:
        if model is None or model in (name, served):
            return True
        if "\0" in model or len(model) > 4096:  # PATH_MAX
            return False
        try:
            return os.path.realpath(os.path.expanduser(model)) in paths
        except (OSError, ValueError):
            return False

    def prepared(endpoint: type["ChatReply"], raw: bytes):
        """The request checked, and its prompt's token ids (in a thread: a body of a megabyte takes a while)."""
        try:
            body = endpoint.schema.model_validate_json(raw, context={"vocab_size": engine.vocab_size})
        except ValidationError as invalid:
            raise Refused(422, problem(invalid))
        if not serves(body.model):
            raise Refused(400, f"This server serves {served!r}, not {body.model[:200]!r}.")
        return body, endpoint.prompt(engine.tokenizer, body)

    async def respond(request: Request, endpoint: type["ChatReply"]):
        try:
            body, prompt = await asyncio.to_thread(prepared, endpoint, await request.body())
            answer = engine.answer(prompt, body.settings(), fit(engine, prompt, body.max_tokens_asked()), body.stop)
            reply = endpoint(served, created, len(prompt), answer)
            if body.stream:
                usage = (body.stream_options or {}).get("include_usage", False)
                return StreamingResponse(reply.events(usage), media_type="text/event-stream")
            text = await unless_the_client_leaves(request, reply.text())
            return Response(status_code=499) if text is None else reply.whole(text)
        except Refused as refused:
            return error(refused.status, refused.detail)
        except ModelStopped as stopped:
            return error(503, f"The model stopped serving ({stopped}); the server is exiting.")
        except Exception as failure:  # a fault of the server or the model, not of the request
            debug = logger.isEnabledFor(logging.DEBUG)
            logger.error("%s failed: %s", request.url.path, first_line(failure), exc_info=debug)
            return error(500, f"The model failed on this request ({first_line(failure)}).")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if engine.alive:
            return {"status": "ok"}
        return error(503, f"The model stopped serving ({engine.failure or 'its batch stopped'}).")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": created, "owned_by": "user"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, ChatReply)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, CompletionReply)

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await respond(request, ResponsesReply)

    return app


def fit(engine: Engine, prompt: list[int], asked: int | None) -> int:
    """The request's max_new_tokens: what it asked for, else DEFAULT_MAX_TOKENS, within what the context leaves."""
    if not prompt:
        raise Refused(422, "The prompt is empty: give at least one token of text.")
    room, context = engine.context_length - len(prompt), engine.context_length
    if room < 1:
        raise Refused(400, f"The prompt has {len(prompt)} tokens, but the model's context holds {context}.")
    if asked is not None and asked > room:
        raise Refused(400, f"The request asks for {asked} new tokens, but its prompt of {len(prompt)} tokens leaves "
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


class ChatReply:
    """One answer as its endpoint writes it: `whole()`, or `events()` for a stream (server-sent events)."""

    schema = ChatRequest
    id_prefix = "chatcmpl-"
    done = "data: [DONE]\n\n"  # what ends a stream

    def __init__(self, model: str, created: int, prompt_tokens: int, answer: Answer):
        self.model, self.created, self.prompt_tokens, self.answer = model, created, prompt_tokens, answer
        self.id = self.id_prefix + uuid.uuid4().hex

    @staticmethod
    def prompt(tokenizer, body) -> list[int]:
        if tokenizer.chat_template is None:
            raise Refused(400, "This model has no chat template: send plain text to /v1/completions.")
        try:  # the template is the model's, its variables the request's: what fails is the request's
            return list(tokenizer.apply_chat_template(
                body.conversation(), tools=body.tool_schemas(), add_generation_prompt=True, tokenize=True,
                return_dict=True, **(getattr(body, "chat_template_kwargs", None) or {}),
            )["input_ids"])
        except Exception as failure:
            raise Refused(422, f"The chat template cannot render these messages ({first_line(failure)}).")

    async def text(self) -> str:
        return "".join([piece async for piece in self.answer])

    def usage(self) -> dict:
        prompt, done = self.prompt_tokens, self.answer.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def chunk(self, delta: dict, finish_reason=None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def whole(self, text: str) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": self.answer.finish_reason, "logprobs": None}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}

    async def stream(self, usage: bool):
        yield self.chunk({"role": "assistant", "content": ""})
        async for piece in self.answer:
            yield self.chunk({"content": piece})
        yield self.chunk({}, self.answer.finish_reason)
        if usage:
            yield {**self.chunk({}), "choices": [], "usage": self.usage()}

    def event(self, data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, usage: bool):
        try:
            async for event in self.stream(usage):
                yield self.event(event)
        except Exception as failure:
            status = 503 if isinstance(failure, ModelStopped) else 500
            detail = {"message": first_line(failure), "type": "server_error", "code": status}
            yield self.event({"type": "error", "error": detail})
        if self.done:
            yield self.done


class CompletionReply(ChatReply):
    schema = CompletionRequest
    id_prefix = "cmpl-"

    @staticmethod
    def prompt(tokenizer, body) -> list[int]:
        return list(tokenizer(body.prompt)["input_ids"])

    def chunk(self, delta: dict, finish_reason=None) -> dict:
        choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish_reason, "logprobs": None}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}

    def whole(self, text: str) -> dict:
        return {**self.chunk({"content": text}, self.answer.finish_reason), "usage": self.usage()}

    async def stream(self, usage: bool):
        async for piece in self.answer:
            yield self.chunk({"content": piece})
        yield self.chunk({}, self.answer.finish_reason)
        if usage:
            yield {**self.chunk({}), "choices": [], "usage": self.usage()}


class ResponsesReply(ChatReply):
    """The Responses API: typed events, the last `response.completed` (no [DONE], as OpenAI's)."""

    schema = ResponseRequest
    id_prefix = "resp_"
    done = ""

    def response(self, text: str | None) -> dict:
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

    def whole(self, text: str) -> dict:
        return self.response(text)

    async def stream(self, usage: bool):
        where, pieces = {"item_id": "msg_" + self.id, "output_index": 0, "content_index": 0}, []
        yield {"type": "response.created", "response": self.response(None)}
        yield {"type": "response.output_item.added", "output_index": 0, "item": self.item(None)}
        yield {"type": "response.content_part.added", **where, "part": {"type": "output_text", "text": ""}}
        async for piece in self.answer:
            pieces.append(piece)
            yield {"type": "response.output_text.delta", **where, "delta": piece}
        text = "".join(pieces)
        yield {"type": "response.output_text.done", **where, "text": text}
        yield {"type": "response.content_part.done", **where, "part": self.item(text)["content"][0]}
        yield {"type": "response.output_item.done", "output_index": 0, "item": self.item(text)}
        yield {"type": "response.completed", "response": self.response(text)}

    def event(self, data: dict) -> str:
        self.sequence = getattr(self, "sequence", -1) + 1
        data = {**data, "sequence_number": self.sequence}
        return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
