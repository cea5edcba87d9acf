"""The requests of /v1/chat/completions, /v1/completions and /v1/responses as pydantic models, parsed strictly by
pydantic's own JSON parser: a wrong type, a value out of range, an unknown field, NaN, a lone surrogate or a number
too large for its field fails, with one sentence (`problem`). OpenAI's fields that the server does not implement are
accepted and ignored (`IGNORED`)."""

import inspect
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

LARGEST = 2**63 - 1  # generate() holds token counts and seeds in int64
Count = Annotated[int, Field(ge=1, le=LARGEST)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Role = Literal["system", "developer", "user", "assistant", "tool"]
# what apply_chat_template and its renderer take themselves: template variables of these names would replace them
RESERVED_TEMPLATE_ARGUMENTS = {"messages"} | {
    name for function in (PreTrainedTokenizerBase.apply_chat_template, render_jinja_template)
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


def text_of(parts: list[TextPart] | None) -> str:
    return " ".join(part.text for part in parts or [])


# a message's content: a string, or a list of text parts
Content = Annotated[list[TextPart], BeforeValidator(lambda v: [{"type": "text", "text": v}] if type(v) is str else v)]


class Message(Checked):
    role: Role
    content: Content
    name: str | None = None


def token_id(key: str, info) -> str:
    vocab_size = (info.context or {}).get("vocab_size")
    if not (key.isascii() and key.isdigit()) or (vocab_size is not None and int(key) >= vocab_size):
        raise ValueError(f"keys must be token ids{f' below {vocab_size}' if vocab_size else ''}")
    return key


def not_the_renderers_own(kwargs: dict) -> dict:
    if reserved := sorted(set(kwargs) & RESERVED_TEMPLATE_ARGUMENTS):
        raise ValueError(f"must not set apply_chat_template's own arguments ({', '.join(reserved)})")
    return kwargs


class Request(Checked):
    """What all three endpoints take."""

    model: str | None = None
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] | None = None
    max_tokens: Count | None = None
    temperature: Finite | None = Field(None, ge=0, le=2)
    top_p: Finite | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=LARGEST)
    n: int = Field(1, ge=1, le=1)
    stop: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=4),
                    BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] | None = None
    # transformers serve's mapping: generate()'s repetition_penalty = 1 + frequency_penalty, which must be above 0
    frequency_penalty: Finite | None = Field(None, gt=-1, le=2)

    @model_validator(mode="before")
    @classmethod
    def ignore(cls, body):
        return {name: value for name, value in body.items() if name not in IGNORED} if isinstance(body, dict) else body

    def max_new_tokens(self) -> int | None:
        return getattr(self, "max_completion_tokens", None) or self.max_tokens

    def settings(self) -> dict:
        """generate()'s settings (over the model's generation config); `temperature` as OpenAI means it: above 0
        samples, 0 is greedy."""
        settings = {"top_p": self.top_p, "seed": self.seed}
        if self.temperature is not None:
            settings.update(temperature=self.temperature, do_sample=self.temperature > 0)
        if self.frequency_penalty is not None:
            settings["repetition_penalty"] = 1 + self.frequency_penalty
        if logit_bias := getattr(self, "logit_bias", None):
            settings["sequence_bias"] = {(int(token),): bias for token, bias in logit_bias.items()}
        return {name: value for name, value in settings.items() if value is not None}


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Count | None = None  # OpenAI's new name of max_tokens: this one if both are given
    logit_bias: dict[Annotated[str, AfterValidator(token_id)], Annotated[Finite, Field(ge=-100, le=100)]] | None = None
    chat_template_kwargs: Annotated[dict[str, Any], AfterValidator(not_the_renderers_own)] | None = None

    def conversation(self) -> list[dict]:
        """As chat templates read it: each message's text as one string."""
        return [{**m.model_dump(exclude={"content"}, exclude_none=True), "content": text_of(m.content)}
                for m in self.messages]


class CompletionRequest(Request):
    prompt: str = Field(min_length=1)


class InputItem(Checked):
    """An item of the Responses API's `input`: a message, or reasoning (which the model does not read)."""

    type: Literal["message", "reasoning"] = "message"
    id: str | None = None
    status: str | None = None
    role: Role | None = None
    content: Content | None = None
    summary: list[TextPart] | None = None

    @model_validator(mode="after")
    def complete(self):
        if self.type == "reasoning" and self.role is not None:
            raise ValueError("an item with a role is a message, not reasoning")
        if self.type == "message" and (self.role is None or self.content is None):
            raise ValueError("a message item needs role and content")
        return self


def input_as_items(value):
    """A string, or a list of text parts, is one user message."""
    parts = isinstance(value, list) and value and all(isinstance(v, dict) and "role" not in v and "text" in v
                                                      for v in value)
    return [{"role": "user", "content": value}] if isinstance(value, str) or parts else value


class ResponseRequest(Request):
    input: Annotated[list[InputItem], BeforeValidator(input_as_items), Field(min_length=1)]
    instructions: str | None = None
    max_tokens: Count | None = Field(None, validation_alias="max_output_tokens")

    def conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return system + [{"role": i.role, "content": text_of(i.content)} for i in self.input if i.type == "message"]


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
