"""The server behind `diff-transformer serve`: transformers serve's own stack, with what keeps clients from killing,
stalling or steering it.

transformers serve (5.25) runs the model in a process of its own (`EngineClient`), which answers requests with a
continuous-batching runner or one at a time with `generate()`; the API process (FastAPI) renders and tokenizes prompts
and decodes answers. This module subclasses the pieces that need it:

- `ServingModelLoader` loads through `AutoModelForCausalLM` (transformers serve looks the architecture up in
  `transformers` itself, which finds no DiffTransformer) and, with continuous batching, builds the batch at load time:
  greedy, its paged cache sized and checked against the context (a clear error at start-up, not at the first request).
- `RoutingEngineClient` sends each request where its settings are honoured exactly: a greedy request joins the batch,
  which answers what `generate()` answers; any other (sampling, a seed, penalties, logit bias) runs alone with
  `generate()` on the model process's one-at-a-time thread, beside the batch. It fits `max_tokens` to the context and
  cuts the answer at its `stop` strings (`StopFilter`), for both paths.
- The handlers check every field of `/v1/chat/completions`, `/v1/completions` and `/v1/responses` (HTTP 422 with one
  sentence) and refuse empty prompts; `ApiKeyGuard` checks the API key, `BodyLimit` the body's size.
"""

import asyncio
import contextlib
import hmac
import inspect
import json
import math
import threading

import torch
from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import EngineClient, ModelLoader, ModelManager
from transformers.cli.serving.response import ResponseHandler
from transformers.cli.serving.server import build_server
from transformers.cli.serving.utils import (
    Detokenizer,
    GenerationState,
    _StreamError,
    canonical_model_id,
    parse_model_id,
    prompt_length,
    set_torch_seed,
)
from transformers.generation.continuous_batching.utils import WorkloadHints

import modeling_diff  # noqa: F401  (registers diff_transformer with the Auto classes, here and in the model's process)

# ---------------------------------------------------------------------------------------------------------------------
# Request checks: each returns what is wrong with a request, in one sentence, or None. transformers serve checks the
# field names; wrong types and values would otherwise fail inside generation (HTTP 500) or steer it.

ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT_PARTS = ("text", "input_text", "output_text")
MAX_STOP_STRINGS = 4
# field: (integer, smallest, largest, smallest excluded)
NUMBERS = {
    "max_tokens": (True, 1, None, False),
    "max_completion_tokens": (True, 1, None, False),
    "max_output_tokens": (True, 1, None, False),
    "n": (True, 1, 1, False),
    "seed": (True, 0, 2**63 - 1, False),
    "temperature": (False, 0, 2, False),
    "top_p": (False, 0, 1, True),
    # transformers serve turns it into generate()'s repetition_penalty = 1 + frequency_penalty, which must be > 0
    "frequency_penalty": (False, -1, 2, True),
}
# the settings a request may give in `generation_config` (a JSON object), as NUMBERS gives them
GENERATION_SETTINGS = {
    "temperature": (False, 0, 100, False),
    "top_k": (True, 0, None, False),
    "top_p": (False, 0, 1, True),
    "min_p": (False, 0, 1, False),
    "typical_p": (False, 0, 1, True),
    "repetition_penalty": (False, 0, 100, True),
    "no_repeat_ngram_size": (True, 0, None, False),
    "max_new_tokens": (True, 1, None, False),
}
MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# apply_chat_template's own arguments, which a request's `chat_template_kwargs` must not replace
RESERVED_TEMPLATE_ARGUMENTS = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) | {
    "num_frames",
    "load_audio_from_video",
}


def number_problem(field: str, value, integer: bool, low, high, low_excluded: bool) -> str | None:
    kind = "an integer" if integer else "a number"
    if high is None:
        bounds = f"{'>' if low_excluded else '>='} {low}"
    elif low == high:
        bounds = f"equal to {low}"
    else:
        bounds = f"between {low} and {high}" + (f", above {low}" if low_excluded else "")
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"`{field}` must be {kind} {bounds}"
    if (
        not math.isfinite(value)
        or value < low
        or (low_excluded and value == low)
        or (high is not None and value > high)
    ):
        return f"`{field}` must be {kind} {bounds}"
    return None


def stop_problem(stop) -> str | None:
    strings = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(strings, list)
        or not 1 <= len(strings) <= MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in strings)
    ):
        return f"`stop` must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} non-empty strings"
    return None


def generation_config_problem(text) -> str | None:
    try:
        settings = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        return "`generation_config` must be a string holding a JSON object of generation settings"
    for name, value in settings.items():
        if name == "do_sample":
            if not isinstance(value, bool):
                return "`generation_config.do_sample` must be true or false"
        elif name not in GENERATION_SETTINGS:
            return f"`generation_config` may set {', '.join(['do_sample', *GENERATION_SETTINGS])}, not `{name}`"
        elif problem := number_problem(f"generation_config.{name}", value, *GENERATION_SETTINGS[name]):
            return problem
    return None


def tools_problem(tools) -> str | None:
    """Chat completions nest each tool ({type, function: {name, ...}}), the Responses API does not."""
    if not isinstance(tools, list):
        return "`tools` must be a list of {type: function, function: {name, description, parameters}} objects"
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if (
            not isinstance(function, dict)
            or tool.get("type") != "function"
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("description", ""), str)
            or not isinstance(function.get("parameters", {}), dict)
        ):
            return f"tools[{i}] must be an object of type `function` with a string `name` and an object `parameters`"
    return None


def json_object_problem(text, where: str) -> str | None:
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        value = None
    return None if isinstance(value, dict) else f"{where} must be a JSON object (or a string holding one)"


def content_problem(content, where: str, may_be_empty: bool = False) -> str | None:
    """A message's content: a string, or a list of text parts ({type: text, text: ...}); this model reads text only."""
    if content is None and may_be_empty:
        return None
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"{where} must be a string or a list of content parts"
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            return f"{where}[{j}] must be a content part: an object with a `type`, such as {{type: text, text: ...}}"
        if part["type"] not in TEXT_PARTS:
            return f"{where}[{j}] has type `{part['type']}`, but this model reads text only"
        if not isinstance(part.get("text"), str):
            return f"{where}[{j}].text must be a string"
    return None


def message_problem(message, where: str) -> str | None:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        return f"{where} must be an object whose `role` is one of {', '.join(ROLES)}"
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if message["role"] != "assistant" or not isinstance(tool_calls, list):
            return f"{where}.tool_calls must be a list, in an assistant message"
        for k, call in enumerate(tool_calls):
            function = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                return f"{where}.tool_calls[{k}] must have a `function` with a string `name`"
            if problem := json_object_problem(
                function.get("arguments"), f"{where}.tool_calls[{k}].function.arguments"
            ):
                return problem
    for field in ("tool_call_id", "name"):
        if field in message and not isinstance(message[field], str):
            return f"{where}.{field} must be a string"
    return content_problem(message.get("content"), f"{where}.content", may_be_empty=message["role"] == "assistant")


def response_item_problem(item, where: str) -> str | None:
    """An item of the Responses API's `input` list: a message, a function call or its output, or reasoning."""
    if not isinstance(item, dict):
        return f"{where} must be an object"
    kind = item.get("type")
    if "role" in item:
        return message_problem({"role": item["role"], "content": item.get("content", "")}, where)
    if kind == "function_call":
        if not all(isinstance(item.get(field), str) for field in ("call_id", "name")):
            return f"{where} (a function_call) must have a string `call_id` and `name`"
        return json_object_problem(item.get("arguments"), f"{where}.arguments")
    if kind == "function_call_output":
        if not all(isinstance(item.get(field), str) for field in ("call_id", "output")):
            return f"{where} (a function_call_output) must have a string `call_id` and `output`"
        return None
    if kind == "reasoning":
        parts = item.get("content") or []
        if not isinstance(parts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts
        ):
            return f"{where}.content must be a list of {{text: ...}} objects"
        return None
    return f"{where} must be a message (with a `role`), a function_call, a function_call_output or reasoning"


def common_problem(body: dict) -> str | None:
    """The fields all three endpoints take."""
    for field, spec in NUMBERS.items():
        if body.get(field) is not None and (problem := number_problem(field, body[field], *spec)):
            return problem
    if body.get("model") is not None and not isinstance(body["model"], str):
        return "`model` must be a string"
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        return "`stream` must be true or false"
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)
    ):
        return "`stream_options` must be an object such as {include_usage: true}"
    if body.get("stop") is not None and (problem := stop_problem(body["stop"])):
        return problem
    if body.get("generation_config") is not None and (problem := generation_config_problem(body["generation_config"])):
        return problem
    if body.get("tools") is not None and (problem := tools_problem(body["tools"])):
        return problem
    for field in ("user", "instructions", "suffix"):
        if body.get(field) is not None and not isinstance(body[field], str):
            return f"`{field}` must be a string"
    return None


def chat_request_problem(body: dict, vocab_size: int | None = None) -> str | None:
    """What is wrong with a /v1/chat/completions request, in one sentence, or None."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if problem := message_problem(message, f"messages[{i}]"):
            return problem
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            return "`logit_bias` must be an object mapping token ids to numbers between -100 and 100"
        for token, value in bias.items():
            if not token.isdigit() or (vocab_size is not None and int(token) >= vocab_size):
                return f"`logit_bias` keys must be token ids below {vocab_size}, not {token!r}"
            if problem := number_problem(f"logit_bias[{token}]", value, False, -100, 100, False):
                return problem
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            return "`chat_template_kwargs` must be an object"
        if reserved := sorted(set(kwargs) & RESERVED_TEMPLATE_ARGUMENTS):
            return f"`chat_template_kwargs` must not set apply_chat_template's own arguments ({', '.join(reserved)})"
    return common_problem(body)


def completion_request_problem(body: dict, vocab_size: int | None = None) -> str | None:
    """What is wrong with a /v1/completions request, in one sentence, or None."""
    if not isinstance(body.get("prompt"), str):
        return "`prompt` must be a string"
    if body.get("logit_bias") is not None:
        return "`logit_bias` is not supported on /v1/completions (it is on /v1/chat/completions)"
    return common_problem(body)


def response_request_problem(body: dict, vocab_size: int | None = None) -> str | None:
    """What is wrong with a /v1/responses request, in one sentence, or None."""
    items = body.get("input")
    if isinstance(items, list) and items:
        if not isinstance(items[0], dict):
            return "input[0] must be an object"
        if "role" not in items[0]:  # transformers serve reads a list that starts without a role as content parts
            if problem := content_problem(items, "input"):
                return problem
        else:
            for i, item in enumerate(items):
                if problem := response_item_problem(item, f"input[{i}]"):
                    return problem
    elif not isinstance(items, str):
        return "`input` must be a string or a non-empty list of messages and items"
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        return "`parallel_tool_calls` must be true or false"
    return common_problem(body)


# ---------------------------------------------------------------------------------------------------------------------
# Handlers: transformers serve's, with the checks above and the settings each request generates with.


class CheckedHandlerMixin:
    """What the three text endpoints add to transformers serve's handlers (put before the handler class)."""

    request_problem = staticmethod(chat_request_problem)

    def _validate_request(self, body: dict) -> None:
        super()._validate_request(body)  # transformers': no unknown field
        engine = self.model_manager.get_engine(body.get("model") if isinstance(body.get("model"), str) else None)
        problem = self.request_problem(body, engine.model_config.get_text_config().vocab_size)
        if problem is not None:
            raise HTTPException(status_code=422, detail=problem)

    def _check_prompt_length(self, engine, inputs: dict) -> None:
        if prompt_length(inputs) == 0:
            raise HTTPException(status_code=422, detail="The prompt is empty: give at least one token of text.")
        super()._check_prompt_length(engine, inputs)  # transformers': longer than the context -> HTTP 400

    def _build_generation_kwargs(self, body: dict, model_generation_config) -> dict:
        """transformers serve's settings, with OpenAI's meaning of `temperature`: above 0 it samples (transformers
        serve would keep a greedy model greedy), 0 is greedy; and `logit_bias` as floats. `max_new_tokens` is marked
        when the request set it: it is then checked against the context, else fitted to it (see
        `RoutingEngineClient.fit_to_context`)."""
        generation_kwargs = super()._build_generation_kwargs(body, model_generation_config)
        if "sequence_bias" in generation_kwargs:  # from `logit_bias`, whose integers generate() refuses
            bias = generation_kwargs["sequence_bias"]
            generation_kwargs["sequence_bias"] = {token_ids: float(value) for token_ids, value in bias.items()}
        temperature = body.get("temperature")
        if temperature is not None and temperature > 0:
            generation_kwargs["do_sample"] = True
        requested = json.loads(body["generation_config"]) if body.get("generation_config") else {}
        asked = any(body.get(field) is not None for field in MAX_TOKEN_FIELDS) or "max_new_tokens" in requested
        generation_kwargs[MAX_TOKENS_ASKED] = asked
        return generation_kwargs


class CheckedChatCompletionHandler(CheckedHandlerMixin, ChatCompletionHandler):
    request_problem = staticmethod(chat_request_problem)


class CheckedCompletionHandler(CheckedHandlerMixin, CompletionHandler):
    request_problem = staticmethod(completion_request_problem)


class CheckedResponseHandler(CheckedHandlerMixin, ResponseHandler):
    request_problem = staticmethod(response_request_problem)


# ---------------------------------------------------------------------------------------------------------------------
# The model: loaded through the Auto classes, its batch greedy and sized at load time; each request routed.

MAX_TOKENS_ASKED = "max_tokens_asked"  # marks generation_kwargs whose max_new_tokens the request set
# generation-config fields that do not change what a greedy batch computes: a model whose config sets any other (a
# repetition penalty, banned words, beams, ...) answers greedy requests with generate() too
BATCH_NEUTRAL_SETTINGS = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_length",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict_in_generate",
    "transformers_version",
    "_from_model_config",
}
# the settings of a request that the greedy batch answers exactly (the sampling ones only matter when it samples)
BATCH_SETTINGS = {"max_new_tokens", "eos_token_id", "do_sample", "temperature", "top_k", "top_p", "seed"}


class BatchPause:
    """Forward hooks on the model that run each forward of `generate_alone` with the batch paused (transformers'
    `manager.pause()`, for threads sharing the model with the batch), so that the two take turns, step by step.

    They must not run at once: a forward sets `config.is_causal` for its duration (transformers'
    `merge_with_config_defaults`), the batch's to False, so the other thread's masks would turn bidirectional, and
    the config could be left so.
    """

    def __init__(self, model, manager):
        self.manager = manager
        self.local = threading.local()  # the pauses of this thread, while it generates alone
        model.register_forward_pre_hook(self.pause)
        model.register_forward_hook(self.resume, always_call=True)

    @contextlib.contextmanager
    def this_thread(self):
        self.local.pauses = contextlib.ExitStack()
        try:
            yield
        finally:
            self.local.pauses.close()
            del self.local.pauses

    def pause(self, module, args) -> None:
        if getattr(self.local, "pauses", None) is not None:  # not in the batch's thread
            self.local.pauses.enter_context(self.manager.pause())

    def resume(self, module, args, output) -> None:
        if getattr(self.local, "pauses", None) is not None:
            self.local.pauses.close()


def start_greedy_batching(model, cb_config, context_length: int | None):
    """Creates the model's continuous-batching manager with its paged cache, at load time.

    transformers serve's runner gets the manager from `model.init_continuous_batching()`, which returns the one cached
    on the model: this one, greedy (no sampling, no logits processor), so that each request in the batch gets what
    `generate()` answers; requests that sample run alone (`generate_alone`). Raises ValueError, saying what to change,
    when the cache cannot be sized or cannot hold one request of the whole context.
    """
    greedy = GenerationConfig(
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id,
        bos_token_id=model.generation_config.bos_token_id,
    )
    hints = WorkloadHints(max_prompt_length=context_length) if context_length else None
    try:
        manager = model.init_continuous_batching(
            generation_config=greedy, continuous_batching_config=cb_config, workload_hints=hints
        )
        manager.warmup()  # creates the paged cache
    except (ValueError, MemoryError) as error:
        raise ValueError(
            f"the paged KV cache does not fit ({str(error).splitlines()[0]}): raise --max-memory-percent or "
            "--num-blocks, or lower --max-batch-tokens"
        ) from error
    capacity = manager.batch_processor.cache.num_blocks * manager.continuous_batching_config.page_size
    if context_length is not None and capacity < context_length:
        raise ValueError(
            f"the paged KV cache holds {capacity} tokens, less than one request of the model's context "
            f"({context_length}): raise --max-memory-percent or --num-blocks, or lower --max-model-len"
        )
    model._cached_continuous_batching_manager = manager
    model.batch_pause = BatchPause(model, manager)
    return manager


class ServingModelLoader(ModelLoader):
    """transformers serve's ModelLoader, loading through AutoModelForCausalLM, and with continuous batching
    (`batching`, a ContinuousBatchingConfig), starting the batch's manager at load time (`start_greedy_batching`).

    It is pickled into the model's process, which loads the model with it.
    """

    def __init__(self, batching=None, generation_state: GenerationState | None = None, **kwargs):
        super().__init__(continuous_batching=batching is not None, **kwargs)
        self.batching = batching
        self.generation_state = generation_state or GenerationState()

    def load_model_and_processor(self, model_id: str, on_progress=None):
        model, processor = super().load_model_and_processor(model_id, on_progress=on_progress)
        if self.batching is not None:
            start_greedy_batching(model, self.batching, self.generation_state.context_length(model.config))
        return model, processor

    def _load_model(self, model_id: str, tqdm_class=None, progress_callback=None):
        # transformers serve picks the class with getattr(transformers, architectures[0]): built-in models only
        repo, revision, gguf_file = parse_model_id(model_id)
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
        return AutoModelForCausalLM.from_pretrained(repo, **kwargs)


def generate_alone(model, processor, inputs: dict, generation_kwargs: dict, streamer=None) -> list[int]:
    """`generate()` for a request the greedy batch cannot answer exactly (it samples, or sets penalties, a logit bias,
    ...), with the model's generation config and the request's settings on top. Runs in the model's process, on the
    runner's one-at-a-time thread (`EngineClient.submit`), its forwards taking turns with the batch's (`BatchPause`).
    Its seed is the only user of the random numbers, as the batch draws none."""
    kwargs = {name: value for name, value in generation_kwargs.items() if value is not None}
    seed = kwargs.pop("seed", None)
    if seed is not None:
        set_torch_seed(seed)
    input_ids = torch.tensor([inputs["input_ids"]], device=model.device)  # [1, prompt]
    batch_pause = getattr(model, "batch_pause", None)
    with batch_pause.this_thread() if batch_pause is not None else contextlib.nullcontext():
        sequences = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), tokenizer=processor, streamer=streamer, **kwargs
        )
    return sequences[0, input_ids.shape[1] :].tolist()


class StopFilter:
    """The queue a `Detokenizer` writes to, ending the answer's text before the first of the `stop` strings (OpenAI's
    meaning). Text that could begin a stop string is held back until it is known not to."""

    def __init__(self, queue: asyncio.Queue, stop: tuple[str, ...]):
        self.queue, self.stop = queue, stop
        self.held = ""
        self.stopped = False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def put_nowait(self, item) -> None:
        if self.stopped:
            return
        if type(item) is not str or not self.stop:  # reasoning, tool calls, the end (None), an error
            if self.held:
                self.queue.put_nowait(self.held)
                self.held = ""
            self.queue.put_nowait(item)
            return
        text = self.held + item
        found = [index for index in (text.find(s) for s in self.stop) if index >= 0]
        if found:
            if min(found) > 0:
                self.queue.put_nowait(text[: min(found)])
            self.held, self.stopped = "", True
            self.queue.put_nowait(None)  # the answer ends here; its consumer then cancels the generation
            return
        cut = max(len(text) - self.hold, 0)
        if cut:
            self.queue.put_nowait(text[:cut])
        self.held = text[cut:]


class StreamFailure(_StreamError):
    """transformers serve's stream error, keeping the exception (an answer that does not stream raises it again)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class StoppingDetokenizer(Detokenizer):
    """transformers serve's Detokenizer writing through a `StopFilter`, and keeping the token ids it received."""

    def __init__(self, tokenizer, queue: asyncio.Queue, response_parser=None, stop: tuple[str, ...] = ()):
        self.filter = StopFilter(queue, stop)
        self.token_ids: list[int] = []
        super().__init__(tokenizer, self.filter, response_parser=response_parser)

    def put_token(self, token_id: int) -> None:
        if self.filter.stopped:  # the answer has ended at a stop string; its generation is being cancelled
            return
        self.token_ids.append(token_id)
        super().put_token(token_id)

    def fail(self, error: Exception) -> None:
        self.filter.put_nowait(StreamFailure(error))


class RoutingEngineClient(EngineClient):
    """transformers serve's client of the model's process, sending each request where its settings are honoured.

    With continuous batching, the batch is greedy (`start_greedy_batching`): a greedy request joins it, any other runs
    alone with `generate_alone`. Every request streams from the model's process, through a `StoppingDetokenizer`:
    `stop` strings end the answer in this process, and an answer that does not stream is cancelled, like one that
    does, when its client leaves.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_matches_generate = set(self.generation_config.to_diff_dict()) <= BATCH_NEUTRAL_SETTINGS

    def batch_takes(self, generation_kwargs: dict) -> bool:
        return (
            self.batch_matches_generate
            and not generation_kwargs.get("do_sample")
            and set(generation_kwargs) <= BATCH_SETTINGS
        )

    def fit_to_context(self, inputs: dict, generation_kwargs: dict) -> None:
        """Caps `max_new_tokens` to what the context leaves after the prompt, or refuses a request that asked for
        more (ValueError: HTTP 400)."""
        asked = generation_kwargs.pop(MAX_TOKENS_ASKED, False)
        context = self.generation_state.context_length(self.model_config)
        if context is None:
            return
        length = prompt_length(inputs)
        room = context - length  # >= 1: longer prompts were refused (_check_prompt_length)
        if generation_kwargs["max_new_tokens"] > room:
            if asked:
                raise ValueError(
                    f"The request asks for {generation_kwargs['max_new_tokens']} new tokens, but its prompt of "
                    f"{length} tokens leaves room for {room} in the model's context of {context}."
                )
            generation_kwargs["max_new_tokens"] = room

    def generate_streaming(self, inputs: dict, generation_kwargs: dict, response_parser=None):
        stop = generation_kwargs.pop("stop_strings", None)
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        self.fit_to_context(inputs, generation_kwargs)
        if self.use_cb and not self.batch_takes(generation_kwargs):
            method, args = "submit", (generate_alone, (dict(inputs), generation_kwargs))
        else:
            method, args = "generate", (dict(inputs), generation_kwargs)
        output_queue = asyncio.Queue()
        tokenizer = getattr(self.processor, "tokenizer", self.processor)._tokenizer
        streamer = StoppingDetokenizer(tokenizer, output_queue, response_parser=response_parser, stop=stop)

        async def wait_for_the_end() -> None:
            try:
                await self._send_request(method, args=args, streamer=streamer)
                streamer.end()
            except asyncio.CancelledError:
                pass
            except Exception as error:
                streamer.fail(error)

        streamer.task = asyncio.create_task(wait_for_the_end())
        return output_queue, streamer

    async def generate_non_streaming(self, inputs: dict, generation_kwargs: dict) -> tuple[str, int, list[int]]:
        queue, streamer = self.generate_streaming(inputs, generation_kwargs)
        pieces = []
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, StreamFailure):
                    raise item.error
                pieces.append(item)
        finally:  # also when the client left (CancelOnDisconnect cancels this): the generation stops
            streamer.cancel()
        if streamer.filter.stopped:
            text = "".join(pieces)
        else:
            text = self.processor.decode(streamer.token_ids, skip_special_tokens=True)
        return text, prompt_length(inputs), streamer.token_ids


class ServingModelManager(ModelManager):
    """transformers serve's ModelManager, serving its one model through a `RoutingEngineClient`."""

    def preload_engine(self, force_model: str, engine_connection: tuple | None) -> None:
        model_id = canonical_model_id(force_model)
        engine = RoutingEngineClient(model_id, self.loader, self.generation_state, connection=engine_connection)
        self.engines[model_id] = engine
        if engine_connection is None:
            engine.start()


# ---------------------------------------------------------------------------------------------------------------------
# The app

ADMIN_ROUTES = ("/reset", "/load_model")
# transformers serve's endpoints for decision and speech models, which a causal LM does not serve
OTHER_MODEL_ROUTES = ("/v1/systemone", "/v1/audio/transcriptions")
OPEN_ROUTES = ("/health",)
DRAINED_BYTES = 8  # times the limit: how much of a body over the limit is read, and dropped, before the 413


class ApiKeyGuard:
    """An ASGI middleware answering HTTP 401, before anything else runs, to a request without the API key (on every
    route but /health)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES:
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                detail = "Missing or wrong API key: send the header `Authorization: Bearer KEY`."
                response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """An ASGI middleware reading each request's body before the app does, up to `max_bytes`: a larger one gets HTTP
    413 (its rest is read and dropped, up to a bound, so that the client sees the answer) and never reaches the app.

    FastAPI's own limit (`max_body_size`) cannot be used: transformers serve's CancelOnDisconnect reads the body in a
    task of its own, where the limit's error is lost and the request then waits for ever.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_bytes:
                while more and size <= DRAINED_BYTES * self.max_bytes:
                    message = await receive()
                    size += len(message.get("body", b""))
                    more = message["type"] == "http.request" and message.get("more_body", False)
                detail = f"The request body is larger than this server's limit of {self.max_bytes} bytes."
                return await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
            chunks.append(message.get("body", b""))
        replayed = False

        async def replay_then_receive():
            nonlocal replayed
            if replayed:
                return await receive()  # the client leaving
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay_then_receive, send)


def build_app(manager: ModelManager, generation_state: GenerationState, api_key, max_body_bytes, admin: bool):
    """transformers serve's FastAPI app for `manager`'s model, with the checked handlers, the admin endpoints only if
    `admin`, a limit on the body's size (`BodyLimit`: HTTP 413), and the API key if there is one (`ApiKeyGuard`)."""
    app = build_server(
        manager,
        CheckedChatCompletionHandler(model_manager=manager, generation_state=generation_state),
        completion_handler=CheckedCompletionHandler(model_manager=manager, generation_state=generation_state),
        response_handler=CheckedResponseHandler(model_manager=manager, generation_state=generation_state),
        transcription_handler=None,  # their routes are removed below
        systemone_handler=None,
    )
    removed = OTHER_MODEL_ROUTES + (() if admin else ADMIN_ROUTES)
    app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) not in removed]
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:  # outside BodyLimit: a request without the key is refused before its body is read
        app.add_middleware(ApiKeyGuard, api_key=api_key)
    return app
