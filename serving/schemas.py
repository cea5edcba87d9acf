"""The requests of /v1/chat/completions, /v1/completions and /v1/responses as pydantic models, parsed by pydantic's
own JSON parser, strictly: a wrong type, a value out of range, an unknown field, NaN, a lone surrogate or a number too
large for its field fail, and the server answers HTTP 422 with one sentence (`problem`). OpenAI's fields that the
server does not implement are accepted and ignored (`IGNORED`)."""

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
Finite = Annotated[float, Field(allow_inf_nan=False)]
Role = Literal["system", "developer", "user", "assistant", "tool"]
# what apply_chat_template and its renderer take themselves: template variables of these names would replace them
RESERVED_TEMPLATE_ARGUMENTS = {"messages"} | {
    name
    for function in (PreTrainedTokenizerBase.apply_chat_template, render_jinja_template)
    for name in inspect.signature(function).parameters
} - {"self", "kwargs"}
IGNORED = (
    "presence_penalty", "logprobs", "top_logprobs", "response_format", "tool_choice", "parallel_tool_calls", "user",
    "metadata", "store", "service_tier", "reasoning_effort", "reasoning", "modalities", "prediction", "truncation",
    "previous_response_id", "include", "text", "echo", "best_of", "suffix", "prompt_cache_key", "safety_identifier",
)


class Checked(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Checked):
    type: Literal["text", "input_text", "output_text", "summary_text", "reasoning_text"]  # this model reads text only
    text: str


# a message's content: a string, or a list of text parts
Content = Annotated[list[TextPart], BeforeValidator(lambda v: [{"type": "text", "text": v}] if type(v) is str else v)]


def text_of(content: list[TextPart] | None) -> str:
    return " ".join(part.text for part in content or [])


class Function(Checked):
    type: Literal["function"] = "function"  # the Responses API's tools: functions with a type
    name: str
    description: str = ""
    parameters: dict[str, Any] = {}
    strict: bool | None = None


class ChatTool(Checked):
    type: Literal["function"]
    function: Function


class ToolCall(Checked):
    class Call(Checked):
        name: str
        arguments: Json[dict[str, Any]]  # a string holding a JSON object

    id: str | None = None
    type: Literal["function"] = "function"
    function: Call


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


class GenerationSettings(Checked):
    """`generation_config` (transformers serve's field): generate()'s own settings, in a string holding JSON."""

    do_sample: bool | None = None
    temperature: Finite | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=0, le=LARGEST)
    top_p: Finite | None = Field(None, gt=0, le=1)
    min_p: Finite | None = Field(None, ge=0, le=1)
    typical_p: Finite | None = Field(None, gt=0, le=1)
    repetition_penalty: Finite | None = Field(None, gt=0, le=100)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=LARGEST)
    max_new_tokens: Count | None = None


class Request(Checked):
    """What all three endpoints take."""

    model: str | None = None
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] | None = None
    temperature: Finite | None = Field(None, ge=0, le=2)
    top_p: Finite | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=LARGEST)
    n: int = Field(1, ge=1, le=1)
    stop: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=4),
                    BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] | None = None
    # transformers serve's mapping: generate()'s repetition_penalty = 1 + frequency_penalty, which must be above 0
    frequency_penalty: Finite | None = Field(None, gt=-1, le=2)
    generation_config: Json[GenerationSettings] | None = None

    @model_validator(mode="before")
    @classmethod
    def ignore(cls, body):
        return {name: value for name, value in body.items() if name not in IGNORED} if isinstance(body, dict) else body

    @model_validator(mode="after")
    def consistent(self):
        if (settings := self.settings()).get("do_sample") and settings.get("temperature") == 0:
            raise ValueError("`temperature` 0 means greedy decoding: drop `do_sample`, or give a temperature above 0")
        return self

    def max_tokens_asked(self) -> int | None:
        names = ("max_completion_tokens", "max_tokens", "max_output_tokens")
        asked = [value for name in names if (value := getattr(self, name, None)) is not None]
        return asked[0] if asked else self.generation_config and self.generation_config.max_new_tokens

    def settings(self) -> dict:
        """generate()'s settings (over the model's generation config); `temperature` as OpenAI means it: above 0
        samples, 0 is greedy."""
        settings = self.generation_config.model_dump(exclude_none=True) if self.generation_config else {}
        settings.pop("max_new_tokens", None)
        if self.temperature is not None:
            settings.update(temperature=self.temperature, do_sample=self.temperature > 0)
        if self.frequency_penalty is not None:
            settings["repetition_penalty"] = 1 + self.frequency_penalty
        settings.update({name: getattr(self, name) for name in ("top_p", "seed") if getattr(self, name) is not None})
        if getattr(self, "logit_bias", None):
            settings["sequence_bias"] = {(int(token),): bias for token, bias in self.logit_bias.items()}
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
    logit_bias: dict[Annotated[str, AfterValidator(token_id)], Annotated[Finite, Field(ge=-100, le=100)]] | None = None
    tools: list[ChatTool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def not_the_renderers_own(cls, kwargs):
        if reserved := sorted(set(kwargs or {}) & RESERVED_TEMPLATE_ARGUMENTS):
            raise ValueError(f"must not set apply_chat_template's own arguments ({', '.join(reserved)})")
        return kwargs

    def conversation(self) -> list[dict]:
        """As chat templates read it: each message's text as one string, tool calls' arguments as dicts."""
        return [{**m.model_dump(exclude={"content"}, exclude_none=True), "content": text_of(m.content)}
                for m in self.messages]

    def tool_schemas(self) -> list[dict] | None:
        return [tool.function.model_dump(exclude={"type"}, exclude_none=True) for tool in self.tools or []] or None


class CompletionRequest(Request):
    prompt: str = Field(min_length=1)
    max_tokens: Count | None = None


class InputItem(Checked):
    """An item of the Responses API's `input`: a message (with a role), a function call, its output, or reasoning
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
        required = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                    "function_call_output": ("call_id", "output"), "reasoning": ()}[self.type]
        if missing := [name for name in required if getattr(self, name) is None]:
            raise ValueError(f"a {self.type} item needs {' and '.join(missing)}")
        if self.role is not None and self.type != "message":
            raise ValueError(f"an item with a role is a message, not {self.type}")
        return self

    def for_template(self) -> dict | None:
        if self.type == "message":
            return {"role": self.role, "content": text_of(self.content)}
        if self.type == "function_call":
            call = {"id": self.call_id, "function": {"name": self.name, "arguments": self.arguments}}
            return {"role": "assistant", "content": "", "tool_calls": [call]}
        if self.type == "function_call_output":
            return {"role": "tool", "content": self.output, "tool_call_id": self.call_id}
        return None


def input_as_items(value):
    """A string, or a list of text parts, is one user message."""
    parts = isinstance(value, list) and value and all(isinstance(v, dict) and "role" not in v and "text" in v
                                                      for v in value)
    return [{"role": "user", "content": value}] if isinstance(value, str) or parts else value


class ResponseRequest(Request):
    input: Annotated[list[InputItem], BeforeValidator(input_as_items), Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Count | None = None
    tools: list[Function] | None = None

    def conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return system + [message for item in self.input if (message := item.for_template()) is not None]

    def tool_schemas(self) -> list[dict] | None:
        return [tool.model_dump(exclude={"type"}, exclude_none=True) for tool in self.tools or []] or None


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
