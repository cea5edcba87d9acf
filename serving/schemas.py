"""The requests of /v1/chat/completions, /v1/completions and /v1/responses as pydantic models.

Bodies are parsed by pydantic's own JSON parser, strictly: a field of the wrong type or out of range, an unknown field,
NaN, a lone surrogate, a number too large for its field all fail validation, and the server answers HTTP 422 with one
sentence (`problem`). Fields of OpenAI's API that this server does not implement are accepted and ignored.
"""

import inspect
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Json,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

LARGEST = 2**63 - 1  # generate() holds token counts and seeds in int64
Count = Annotated[int, Field(ge=1, le=LARGEST)]
Role = Literal["system", "developer", "user", "assistant", "tool"]
# what apply_chat_template and its renderer take themselves: a template variable of these names would replace them
RESERVED_TEMPLATE_ARGUMENTS = (
    set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    | set(inspect.signature(render_jinja_template).parameters)
    | {"messages"}
) - {"self", "kwargs"}
IGNORED = (  # OpenAI's fields that this server accepts and does not implement
    "presence_penalty", "logprobs", "top_logprobs", "response_format", "tool_choice", "parallel_tool_calls", "user",
    "metadata", "store", "service_tier", "reasoning_effort", "reasoning", "modalities", "prediction", "truncation",
    "previous_response_id", "include", "text", "echo", "best_of", "suffix", "prompt_cache_key", "safety_identifier",
)


def Number(**bounds):  # noqa: N802  (a type)
    return Annotated[float, Field(allow_inf_nan=False, **bounds)]


class Checked(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Checked):
    type: Literal["text", "input_text", "output_text", "summary_text", "reasoning_text"]  # this model reads text only
    text: str


# a message's content: a string, or a list of text parts
Content = Annotated[list[TextPart], BeforeValidator(lambda v: [{"type": "text", "text": v}] if isinstance(v, str) else v)]
Stop = Annotated[
    list[Annotated[str, Field(min_length=1)]],
    BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
    Field(min_length=1, max_length=4),
]


class FunctionCall(Checked):
    name: str
    arguments: Json[dict[str, Any]]  # a string holding a JSON object


class ToolCall(Checked):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Checked):
    role: Role
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def complete(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs a content")
        return self

    def for_template(self) -> dict:
        """The message as chat templates read it: text-only content as one string, tool calls' arguments as dicts."""
        message = {"role": self.role, "content": " ".join(part.text for part in self.content or [])}
        if self.tool_calls:
            message["tool_calls"] = [
                {"type": "function", "function": call.function.model_dump(), **({"id": call.id} if call.id else {})}
                for call in self.tool_calls
            ]
        message.update(self.model_dump(include={"name", "tool_call_id"}, exclude_none=True))
        return message


class Function(Checked):
    name: str
    description: str = ""
    parameters: dict[str, Any] = {}
    strict: bool | None = None


class ChatTool(Checked):
    type: Literal["function"]
    function: Function


class ResponseTool(Function):
    """A tool of the Responses API, which does not nest the function."""

    type: Literal["function"]


class GenerationSettings(Checked):
    """`generation_config` (transformers serve's field): generate()'s own settings, as a string holding JSON."""

    do_sample: bool | None = None
    temperature: Number(ge=0, le=100) | None = None
    top_k: int | None = Field(None, ge=0, le=LARGEST)
    top_p: Number(gt=0, le=1) | None = None
    min_p: Number(ge=0, le=1) | None = None
    typical_p: Number(gt=0, le=1) | None = None
    repetition_penalty: Number(gt=0, le=100) | None = None
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=LARGEST)
    max_new_tokens: Count | None = None


class StreamOptions(Checked):
    include_usage: bool = False


class Request(Checked):
    """What all three endpoints take."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Number(ge=0, le=2) | None = None
    top_p: Number(gt=0, le=1) | None = None
    seed: int | None = Field(None, ge=0, le=LARGEST)
    n: int = Field(1, ge=1, le=1)
    stop: Stop | None = None
    # transformers serve's mapping: generate()'s repetition_penalty = 1 + frequency_penalty, which must be above 0
    frequency_penalty: Number(gt=-1, le=2) | None = None
    generation_config: Json[GenerationSettings] | None = None
    ignored: dict = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def set_aside_ignored_fields(cls, body):
        if isinstance(body, dict):
            body = dict(body)
            body["ignored"] = {name: body.pop(name) for name in IGNORED if name in body}
        return body

    @model_validator(mode="after")
    def consistent(self):
        settings = self.settings()
        if settings.get("do_sample") and settings.get("temperature") == 0:
            raise ValueError("`temperature` 0 means greedy decoding: drop `do_sample`, or give a temperature above 0")
        return self

    @property
    def max_tokens_asked(self) -> int | None:
        return self.generation_config.max_new_tokens if self.generation_config else None

    def settings(self) -> dict:
        """generate()'s settings for this request (the model's generation config fills in the rest). OpenAI's meaning
        of `temperature`: above 0 samples, 0 is greedy."""
        settings = self.generation_config.model_dump(exclude_none=True) if self.generation_config else {}
        settings.pop("max_new_tokens", None)
        if self.temperature is not None:
            settings.update(temperature=self.temperature, do_sample=self.temperature > 0)
        if self.top_p is not None:
            settings["top_p"] = self.top_p
        if self.frequency_penalty is not None:
            settings["repetition_penalty"] = 1 + self.frequency_penalty
        if self.seed is not None:
            settings["seed"] = self.seed
        return settings


def token_id(key: str, info: ValidationInfo) -> str:
    vocab_size = (info.context or {}).get("vocab_size")
    if not (key.isascii() and key.isdigit()) or (vocab_size is not None and int(key) >= vocab_size):
        raise ValueError(f"keys must be token ids{f' below {vocab_size}' if vocab_size else ''}")
    return key


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logit_bias: dict[Annotated[str, AfterValidator(token_id)], Number(ge=-100, le=100)] | None = None
    tools: list[ChatTool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def not_the_renderers_own(cls, kwargs):
        if reserved := sorted(set(kwargs or {}) & RESERVED_TEMPLATE_ARGUMENTS):
            raise ValueError(f"must not set apply_chat_template's own arguments ({', '.join(reserved)})")
        return kwargs

    @property
    def max_tokens_asked(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens or super().max_tokens_asked

    def settings(self) -> dict:
        settings = super().settings()
        if self.logit_bias:
            settings["sequence_bias"] = {(int(token),): bias for token, bias in self.logit_bias.items()}
        return settings

    def conversation(self) -> list[dict]:
        return [message.for_template() for message in self.messages]

    def tool_schemas(self) -> list[dict] | None:
        return [tool.function.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None


class CompletionRequest(Request):
    prompt: str = Field(min_length=1)
    max_tokens: Count | None = None

    @property
    def max_tokens_asked(self) -> int | None:
        return self.max_tokens or super().max_tokens_asked


class InputItem(Checked):
    """An item of the Responses API's `input`: a message (it has a `role`), a function call, its output, or reasoning
    (which the model does not read)."""

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    id: str | None = None
    status: str | None = None
    role: Role | None = None
    content: Content | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: Json[dict[str, Any]] | None = None
    output: str | None = None
    summary: list[TextPart] | None = None

    @model_validator(mode="after")
    def complete(self):
        required = {
            "message": ("role", "content"),
            "function_call": ("call_id", "name", "arguments"),
            "function_call_output": ("call_id", "output"),
            "reasoning": (),
        }[self.type]
        if missing := [name for name in required if getattr(self, name) is None]:
            raise ValueError(f"a {self.type} item needs {' and '.join(missing)}")
        if self.role is not None and self.type != "message":
            raise ValueError(f"an item with a role is a message, not {self.type}")
        return self

    def for_template(self) -> dict | None:
        if self.type == "message":
            return {"role": self.role, "content": " ".join(part.text for part in self.content)}
        if self.type == "function_call":
            call = {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
            return {"role": "assistant", "content": "", "tool_calls": [call]}
        if self.type == "function_call_output":
            return {"role": "tool", "content": self.output, "tool_call_id": self.call_id}
        return None


def input_as_items(value):
    """A string, or a list of text parts, is one user message."""
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(v, dict) and "text" in v and "role" not in v for v in value)
    ):
        return [{"role": "user", "content": value}]
    return value


class ResponseRequest(Request):
    input: Annotated[list[InputItem], BeforeValidator(input_as_items), Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Count | None = None
    tools: list[ResponseTool] | None = None

    @property
    def max_tokens_asked(self) -> int | None:
        return self.max_output_tokens or super().max_tokens_asked

    def conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return system + [message for item in self.input if (message := item.for_template()) is not None]

    def tool_schemas(self) -> list[dict] | None:
        return [tool.model_dump(exclude={"type"}, exclude_none=True) for tool in self.tools] if self.tools else None


def problem(error: ValidationError) -> str:
    """One sentence for the most specific of a validation's errors: where (`messages[0].content`) and what."""
    details = max(error.errors(), key=lambda detail: len(detail["loc"]))
    loc = [part for part in details["loc"] if part != "[key]"]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    message = details["msg"].removeprefix("Value error, ").removeprefix("Invalid JSON: ")
    if details["type"] == "json_invalid" and not where:
        return f"The body is not valid JSON ({message}): a JSON object is expected, in UTF-8, without NaN."
    if details["type"] == "extra_forbidden":
        return f"`{where}` is not a field of this endpoint."
    return f"`{where}`: {message}." if where else f"{message}."
