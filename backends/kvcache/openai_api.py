"""The OpenAI-compatible request bodies ``orch serve`` accepts, checked strictly.

A parameter we do not implement is refused with a 400 that names it, never silently ignored:
unknown fields, and known ones (``n``, ``logprobs``, ``tools``, penalties, ``stop`` ...) set to
anything but their neutral value. Neutral values are accepted because common clients send them
(``vllm bench serve`` sends ``logprobs: null`` and ``repetition_penalty: 1.0``).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends.kvcache.sampling import SamplingParams

# parameter -> the values that mean "not used" (accepted and ignored)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "stop": (None, "", []),
    "stop_token_ids": (None, []),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, False),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """Fields both routes share: sampling, streaming, length, and the refused-unless-neutral ones."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)  # None: 1.0, as OpenAI's API
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool | None = None
    user: str | None = None
    # refused unless neutral (see NEUTRAL)
    n: Any = None
    best_of: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    stop: Any = None
    stop_token_ids: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    logit_bias: Any = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        for name in sorted(self.model_fields_set & NEUTRAL.keys()):
            value = getattr(self, name)
            if value not in NEUTRAL[name]:
                raise ValueError(f"parameter {name!r} is not supported by this server (got {value!r})")
        return self

    def sampling(self) -> SamplingParams:
        """The request's sampling parameters (OpenAI's defaults: temperature 1, top_p 1)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(temperature=temperature, top_p=1.0 if self.top_p is None else self.top_p,
                              seed=self.seed)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: Any = None
    suffix: Any = None

    def prompt_one(self) -> str | list[int]:
        """The single prompt (a batch of one is unwrapped; more than one is refused)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"parameter 'prompt': one prompt per request, got {len(prompt)}")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("parameter 'prompt': empty")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (``developer`` is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens``, else the older ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


RequestT = TypeVar("RequestT", bound=_Request)


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """``body`` validated as ``model``; a ValueError with one line naming the parameter otherwise."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("str", "list[", "function-")))
        if first["type"] == "extra_forbidden":
            raise ValueError(f"parameter {loc!r} is not supported by this server") from None
        message = first["msg"].removeprefix("Value error, ")
        raise ValueError(f"parameter {loc!r}: {message}" if loc else message) from None


class TextStream:
    """Decodes a growing list of token ids to text pieces, holding back an incomplete character."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.token_ids: list[int] = []
        self.sent = 0  # characters already returned

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """The text the new tokens add (an incomplete UTF-8 sequence waits for the next call)."""
        self.token_ids += new_ids
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd") and not final:
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece
