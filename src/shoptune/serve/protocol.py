"""Request bodies of the OpenAI-compatible API (the fields vLLM's server takes that we honour).

Unknown fields are accepted and ignored, as by OpenAI's and vLLM's servers; fields we know but do
not implement (tools, tool_choice, an assistant's tool_calls, penalties, best_of, suffix, logprobs
on a stream) are refused with a 400 naming the field instead of being silently ignored. Types are
strict, as OpenAI's schema states them: ``"n": "2"``, ``"echo": "yes"`` or a prompt of booleans
are 400, not coerced (a whole number is still a valid float).

``logit_bias`` is OpenAI's: token id (a decimal string) -> a bias in [-100, 100] added to that
token's logit at every generated position of the request's rows (the handler checks the ids
against the vocabulary). ``shoptune_plan`` (:class:`ShoptunePlan`, ``/v1/completions`` only) is
shoptune's extension: the decoding constraint of the task endpoint (number lists, stop at the line
end) on a plain completion, which is how a gateway hands a task to a shoptune upstream.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, WrapValidator, field_validator,
                      model_serializer, model_validator)
from pydantic_core import PydanticCustomError

MIN_TEMPERATURE = 0.01  # below it (other than 0, greedy) the logits / temperature overflow
MAX_STOPS = 32  # stop strings per request ...
MAX_STOP_CHARS = 4096  # ... and their total length
MAX_LOGPROBS = 20  # alternatives per token (vLLM's default max_logprobs)
# vLLM's range for `seed` (a signed 64-bit integer); seed + k (choice k of n) stays within what
# torch.Generator.manual_seed takes (-2**63 .. 2**64 - 1)
MIN_SEED, MAX_SEED = -2**63, 2**63 - 1
STRICT = ConfigDict(strict=True)
MAX_LOGIT_BIAS = 1024  # logit_bias entries per request
MAX_BIAS = 100.0  # |bias| at most (OpenAI's and vLLM's range)
MAX_PLAN_VALUES = 4096  # shoptune_plan.values entries, and its count, at most
MAX_PLAN_VALUE = 10**40 - 1  # a list number has at most 40 digits (decoding.MAX_LIST_DIGITS)
_TOKEN_ID = re.compile(r"[0-9]{1,10}")


def one_of(expected: str) -> WrapValidator:
    """A union's type error as one message ("must be a string or a list of strings") at the
    field itself, instead of one error per union member (``prompt.list[int].0``)."""
    def check(value, handler):
        try:
            return handler(value)
        except ValidationError as e:
            if all(err["type"].endswith("_type") for err in e.errors()):
                raise PydanticCustomError("type_error", "must be {expected}", {"expected": expected}) from None
            raise
    return WrapValidator(check)


Prompt = Annotated[str | list[str] | list[int] | list[list[int]],
                   one_of("a string, a list of strings, a list of token ids (integers) or a list of "
                          "lists of token ids")]
Stop = Annotated[str | list[str] | None, one_of("a string or a list of strings")]


def find_invalid_text(obj) -> str | None:
    """Dotted path (``messages.0.content``) of the first string, key or value, in parsed JSON that
    is not valid Unicode (a lone surrogate such as ``"\\ud800"``); None if all are."""
    stack = [((), obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return ".".join(map(str, path)) or "body"
        elif isinstance(value, dict):
            for k, v in reversed(list(value.items())):
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:  # a bad key: reported at the object holding it
                    return ".".join(map(str, path)) or "body"
                stack.append(((*path, k), v))
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(value))))
    return None


Bias = Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS, allow_inf_nan=False)]


MAX_GRAMMAR_BYTES = 256 << 10  # an own task's answer grammar (GBNF text; a 200-label set is ~10 KB)


class ShoptunePlan(BaseModel):
    """shoptune's extension of ``/v1/completions``: the constraint its task endpoint decodes with
    (:class:`shoptune.decoding.Plan`), applied to this completion's rows exactly as there. The
    token limit is the request's ``max_tokens``. Multiple choice is not a plan kind here: ask one
    token with ``logit_bias`` +100 on the option tokens (what the gateway does for any engine)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    kind: Literal["generate"] = "generate"
    numeric: bool = Field(default=False, description=(
        "Only a list of numbers may be written: 'n, n, n' (digits, ', '), then the line end."))
    max_value: int = Field(default=99, ge=1, le=MAX_PLAN_VALUE, description=(
        "numeric: the largest number (numbers are 1..max_value when values is empty)."))
    count: int = Field(default=3, ge=1, le=MAX_PLAN_VALUES, description="numeric: how many numbers.")
    unique: bool = Field(default=False, description="numeric: no number twice (a ranking).")
    values: list[Annotated[int, Field(ge=1, le=MAX_PLAN_VALUE)]] = Field(
        default_factory=list, max_length=MAX_PLAN_VALUES,
        description="numeric: exactly these numbers may be written (empty: 1..max_value).")
    stop_newline: bool = Field(default=False, description=(
        "The row ends at the first line end that follows some text (a one-line answer)."))
    grammar: str | None = Field(default=None, min_length=1, max_length=MAX_GRAMMAR_BYTES, description=(
        "An own task's answer grammar (GBNF, as shoptune.tasks.gbnf writes it: one of its labels, "
        "or JSON valid against its schema)."))


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=16)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, Bias] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v: dict[str, float] | None):
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries (got {len(v)})")
        seen: dict[int, str] = {}
        for key in v:
            if not _TOKEN_ID.fullmatch(key):
                shown = key if len(key) <= 20 else f"{key[:20]}..."
                raise ValueError(f"key {shown!r} is not a token id (a decimal integer, e.g. \"50256\")")
            if int(key) in seen:  # ("57" and "057": one token, two biases; each must stay in range)
                raise ValueError(f"token id {int(key)} is given twice ({seen[int(key)]!r} and {key!r})")
            seen[int(key)] = key
        return v

    def token_bias(self) -> dict[int, float] | None:
        """``logit_bias`` with integer token ids (None: no bias, or only zeros)."""
        bias = {int(k): float(b) for k, b in (self.logit_bias or {}).items() if b}
        return bias or None

    @field_validator("temperature")
    @classmethod
    def _computable_temperature(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}; smaller values "
                             "cannot be computed")
        return v

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, v: str | list[str] | None):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings (got {len(stops)})")
        total = sum(map(len, stops))
        if total > MAX_STOP_CHARS:
            raise ValueError(f"stop strings may total at most {MAX_STOP_CHARS} characters (got {total})")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)

    def unsupported(self) -> list[str]:
        bad = []
        if self.presence_penalty:
            bad.append("presence_penalty")
        if self.frequency_penalty:
            bad.append("frequency_penalty")
        return bad


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=0)  # 0: only the prompt's logprobs (with echo)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None
    shoptune_plan: ShoptunePlan | None = Field(default=None, description=(
        "shoptune extension: decode with the task endpoint's constraint (see ShoptunePlan)."))

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        bad += [k for k, v in (("best_of", self.best_of not in (None, 1)), ("suffix", self.suffix),
                               ("logprobs", self.logprobs is not None and self.stream))
                if v]
        return bad


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart] | None,
                       one_of("a string or a list of text parts ({\"type\": \"text\", \"text\": ...})")] = None

    def problem(self) -> tuple[str, str] | None:
        """(field, why) when the message asks for what this server cannot do, or says nothing."""
        extra = self.model_extra or {}
        for key in ("tool_calls", "function_call"):
            if extra.get(key) is not None:
                return key, (f"{key} is not supported by this server (it serves no tools); send the "
                             "assistant's earlier answer as content")
        if self.content is None or self.content == []:
            return "content", f"{'an' if self.role == 'assistant' else 'a'} {self.role} message needs content"
        return None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None  # (OpenAI's older names for tools and tool_choice)
    function_call: Any = None
    response_format: dict | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return v

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.logprobs and self.stream:
            bad.append("logprobs")
        if self.tools:
            bad.append("tools")
        if self.tool_choice not in (None, "none"):  # what "none" asks for is what is served
            bad.append("tool_choice")
        if self.functions:
            bad.append("functions")
        if self.function_call not in (None, "none"):
            bad.append("function_call")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            bad.append("response_format")
        if (self.model_extra or {}).get("shoptune_plan") is not None:
            bad.append("shoptune_plan")  # (an extension of /v1/completions only)
        return bad


class TaskRequest(BaseModel):
    """The body of ``POST /v1/tasks/{task}``: the task's fields go under ``input``."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(default=None, description=(
        "Adapter (or base model) to answer with; default: the adapter named like the task if "
        "loaded, else the base model."))
    input: dict[str, Any] = Field(description="The task's input fields (its input_schema).")

    @model_validator(mode="before")
    @classmethod
    def _fields_under_input(cls, data):
        """A body with the task's fields at the top level (no ``input``): one error saying where
        they go, instead of "field required" plus one "extra input" per field."""
        if isinstance(data, dict) and "input" not in data:
            stray = sorted(k for k in data if isinstance(k, str) and k != "model")
            if stray:
                raise PydanticCustomError(
                    "fields_under_input", "the task's fields go under `input`: send {\"model\": ..., "
                    "\"input\": {fields}} (got {got} at the top level)",
                    {"fields": "{" + ", ".join(f'"{k}": ...' for k in stray[:5]) + "}",
                     "got": ", ".join(stray[:5]) + (" ..." if len(stray) > 5 else "")})
        return data


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_path: str | None = Field(default=None, description=(
        "Folder inside --adapters-dir (relative, or absolute but inside it); default: lora_name."))


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str


# ----------------------------------------------------------------------------- responses
# What the handlers return (vLLM's protocol.py shape), serialised with the keys OpenAI's API sends:
# null where OpenAI sends null (``logprobs``), absent where it omits the key (``usage`` on a stream
# chunk, an empty chat ``delta``): the fields in ``_omit_if_none``.

class _Reply(BaseModel):
    _omit_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler):
        out = handler(self)
        for key in self._omit_if_none:
            if out.get(key, 0) is None:
                del out[key]
        return out

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shoptune"
    root: str | None = Field(default=None, description=(
        "Base model: its name. Adapter: its folder as lora_path takes it (relative to "
        "--adapters-dir), None for one served from elsewhere; vLLM shows the load path here."))
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogProbs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(_Reply):
    _omit_if_none = ("usage",)
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None  # absent on stream chunks, set on replies and the usage chunk


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(_Reply):
    _omit_if_none = ("role", "content")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Reply):
    _omit_if_none = ("usage",)
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class TaskInfo(BaseModel):
    id: str
    object: Literal["task"] = "task"
    capability: str
    task_type: str
    metric: str
    metrics: list[str] = Field(description="Every metric of the task (the first is its score).")
    labels: list[str] | None = Field(default=None, description="label / labels tasks: the allowed labels.")
    answer_schema: dict[str, Any] = Field(description="JSON schema of the result's `answer`.")
    description: str
    adapter: str | None = Field(description="The adapter that answers it by default (None: the base model).")
    aliases: list[str] = Field(default_factory=list, description=(
        "Other names /v1/tasks/{task} takes for it: ShopBench's own task name as evaluation "
        "reports print it (task2 for shopbench_task2)."))
    request_schema: dict[str, Any] = Field(description=(
        "JSON schema of the whole POST /v1/tasks/{task} body: {\"model\": ..., \"input\": {...}}."))
    input_schema: dict[str, Any] = Field(description=(
        "JSON schema of the body's `input` object only (the fields go under `input`)."))


class TaskList(BaseModel):
    object: Literal["list"] = "list"
    protocol: str
    data: list[TaskInfo]


class TaskResult(_Reply):
    model_config = ConfigDict(extra="forbid")  # a key the answer parser adds must be declared here
    _omit_if_none = ("answer_text", "answer_items")
    id: str
    object: Literal["task.result"] = "task.result"
    task: str
    task_type: str
    metric: str
    model: str
    answer: Any = Field(description="The parsed answer, as the evaluator parses it (None: unparseable).")
    raw: str = Field(description="The model's answer line.")
    answer_text: str | None = Field(default=None, description="Multiple choice: the chosen option.")
    answer_items: list[str] | None = Field(default=None, description="Ranking/retrieval: the chosen candidates.")
    usage: UsageInfo


class AdapterStatus(BaseModel):
    status: Literal["ok"] = "ok"
    lora_name: str
    models: list[str]


class HealthStatus(BaseModel):
    status: Literal["ok", "unavailable"]
    live: bool
    ready: bool
    reason: str | None = None
    model: str
    adapters: list[str]
    queue_depth: int
