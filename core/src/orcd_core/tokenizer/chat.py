"""Chat templates: `tokenizer.chat_template` rendered with Jinja2 in an `ImmutableSandboxedEnvironment`.

The environment matches what Hugging Face transformers gives templates (trim_blocks, lstrip_blocks,
the `loopcontrols` extension, a `tojson` that does not HTML-escape, `raise_exception`,
`strftime_now`), with `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and any extra
variables (e.g. `tools`) in the context.

Limits, all reported as `ChatTemplateError` for that request (never a crash of the worker):
- time: the render runs in a helper thread; past `timeout_s` an exception is raised inside it
  (`PyThreadState_SetAsyncExc`), which stops any Python-level loop of the compiled template;
- size: the output is assembled chunk by chunk and stops at `max_output_chars`; string and list
  repetition (`*`), `**`, and filter or method calls with integer arguments above that limit (e.g.
  `center(10**9)`) are refused before they allocate; values read through attributes, items, calls
  and filters longer than the limit are refused (a string doubled in a `namespace` stops there);
  integer `*` and `**` whose result would pass `MAX_INT_BITS`, and format strings (`%`, the
  `format` filter, `str.format`) with a width or precision over the limit, are refused before the
  one C call that would hold the GIL (and stall every other thread, /health included);
  `raise_exception` reports at most `MAX_RAISED_CHARS` of its message;
- sandbox: attribute access to internals (`__class__`, `__globals__`, `mro`, ...) and mutation of
  arguments raise `SecurityError` -> `ChatTemplateError`.

Fallback: a model without a template gets ChatML (`CHATML_TEMPLATE`, as llama.cpp falls back to):
    <|im_start|>{role}\\n{content}<|im_end|>\\n ... and, with add_generation_prompt,
    <|im_start|>assistant\\n
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ChatTemplateError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_TIMEOUT_S = 1.0
DEFAULT_MAX_OUTPUT_CHARS = 1_000_000
MAX_INT_BITS = 1 << 16  # integers a template computes stay below 2**65536 (one C call on a bigger one holds the GIL)
MAX_RAISED_CHARS = 500  # what `raise_exception(message)` reports of its message

# a width or precision inside a format string: printf style (`%0999d`, `%.99f`) and str.format (`{:>999}`)
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\d*)(?:\.(\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")
_DIGITS = re.compile(r"\d+")


class _TemplateAbort(BaseException):
    """Raised inside the render thread on timeout (a BaseException: template-level code and Jinja's
    `except Exception` blocks do not swallow it)."""


class _RaisedByTemplate(Exception):
    pass


class _Limits:
    def __init__(self, max_chars: int):
        self.max_chars = max_chars


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox plus size guards on operations that can allocate without bound."""

    intercepted_binops = frozenset(["*", "**", "%"])

    def __init__(self, limits: _Limits, **kw: Any):
        super().__init__(**kw)
        self._limits = limits

    def _check_size(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self._limits.max_chars:
            raise ChatTemplateError(f"chat template built a value of {len(value)} items, over the limit {self._limits.max_chars}")
        return value

    def _check_args(self, args, kwargs) -> None:
        for v in (*args, *kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > self._limits.max_chars:
                raise ChatTemplateError(f"chat template passed the integer {v}, over the limit {self._limits.max_chars}")

    def _check_format(self, fmt: Any, pattern: re.Pattern) -> None:
        """Refuse a format string whose width or precision exceeds the output limit: formatting
        allocates it in one C call, before any output check could run."""
        if not isinstance(fmt, str):
            return
        for spec in pattern.finditer(fmt):
            for digits in _DIGITS.findall(spec.group(0)[1:]):
                if len(digits) > 9 or int(digits) > self._limits.max_chars:
                    raise ChatTemplateError(f"chat template formats with a width of {digits[:20]}, over the limit")

    def wrap_str_format(self, value: Any):
        """`'{:>9}'.format(...)` read in a template (the sandbox wraps str.format here)."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            self._check_format(value.__self__, _BRACE_SPEC)
        return wrapped

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        ints = isinstance(left, int) and isinstance(right, int) and not isinstance(left, bool)
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise ChatTemplateError(f"chat template computes a power with exponent {right}")
            if ints and left.bit_length() * max(right, 1) > MAX_INT_BITS:
                raise ChatTemplateError(f"chat template computes an integer of more than {MAX_INT_BITS} bits")
        elif operator == "*":
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise ChatTemplateError(f"chat template computes an integer of more than {MAX_INT_BITS} bits")
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    if len(seq) * count > self._limits.max_chars:
                        raise ChatTemplateError("chat template repeats a value beyond the output limit")
        elif operator == "%":
            self._check_format(left, _PRINTF_SPEC)
        return self._check_size(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        return self._check_size(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        return self._check_size(super().getitem(obj, argument))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        __self._check_args(args, kwargs)
        return __self._check_size(super().call(__context, __obj, *args, **kwargs))


def _guard_filter(env: _GuardedEnvironment, fn):
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        env._check_args(args[1:], kwargs)
        return env._check_size(fn(*args, **kwargs))

    return guarded


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str = "") -> None:
    text = str(message)
    if len(text) > MAX_RAISED_CHARS:
        text = text[:MAX_RAISED_CHARS] + f"… ({len(text)} characters)"
    raise _RaisedByTemplate(text)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(source: str, max_chars: int):
    limits = _Limits(max_chars)
    env = _GuardedEnvironment(limits, trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters = {name: _guard_filter(env, fn) for name, fn in env.filters.items()}
    env.filters["tojson"] = _guard_filter(env, _tojson)
    format_filter = env.filters["format"]

    def guarded_format(value, *args, **kwargs):
        env._check_format(value, _PRINTF_SPEC)
        return format_filter(value, *args, **kwargs)

    env.filters["format"] = guarded_format
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _async_raise(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))


def template_error(source: str) -> str | None:
    """None when `source` compiles as a chat template, else the reason in one line (the vocabulary
    checks a file's template at load, so a broken one is a load error, not a failure of every chat)."""
    try:
        _compile(source, DEFAULT_MAX_OUTPUT_CHARS)
    except jinja2.TemplateSyntaxError as exc:
        reason = f"syntax error at line {exc.lineno}: {exc.message}"
    except Exception as exc:  # noqa: BLE001  (the sandbox's compile errors vary)
        reason = f"{type(exc).__name__}: {exc}"
    else:
        return None
    return " ".join(reason.split())[:300]


def render_chat(
    tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = True,
    *,
    template: str | None = None,
    extra_context: Mapping[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
) -> str:
    """Render `messages` with the model's chat template (or `template`, or the ChatML fallback).
    Raises `ChatTemplateError` on any failure: syntax, `raise_exception`, sandbox violation, time or
    size limit, bad `messages`."""
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise ChatTemplateError("messages must be a list of objects with 'role' and 'content'")
    source = template if template is not None else (getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE)
    try:
        compiled = _compile(source, max_output_chars)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from None
    except Exception as exc:
        raise ChatTemplateError(f"chat template cannot be compiled: {type(exc).__name__}: {exc}") from None

    context = dict(extra_context or {})
    context.update(
        messages=[dict(m) for m in messages],
        add_generation_prompt=bool(add_generation_prompt),
        bos_token=getattr(tokenizer, "bos_text", ""),
        eos_token=getattr(tokenizer, "eos_text", ""),
    )
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            parts: list[str] = []
            size = 0
            for chunk in compiled.generate(**context):
                size += len(chunk)
                if size > max_output_chars:
                    raise ChatTemplateError(f"chat template output exceeds {max_output_chars} characters")
                parts.append(chunk)
            result["text"] = "".join(parts)
        except _TemplateAbort:
            result["error"] = ChatTemplateError(f"chat template did not finish within {timeout_s} s")
        except ChatTemplateError as exc:
            result["error"] = exc
        except _RaisedByTemplate as exc:
            result["error"] = ChatTemplateError(f"chat template raised: {exc}")
        except jinja2.exceptions.SecurityError as exc:
            result["error"] = ChatTemplateError(f"chat template violated the sandbox: {exc}")
        except RecursionError:
            result["error"] = ChatTemplateError("chat template recursed too deeply")
        except MemoryError:
            result["error"] = ChatTemplateError("chat template ran out of memory")
        except Exception as exc:  # any template runtime error (undefined variable, type error, ...)
            result["error"] = ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}")

    def run() -> None:
        try:
            work()
        except _TemplateAbort:  # arrived after the render had finished
            pass

    thread = threading.Thread(target=run, name="orcd-chat-template", daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        _async_raise(thread, _TemplateAbort)
        thread.join(1.0)
        if thread.is_alive():  # stuck inside one C call; it is abandoned (daemon) and reported
            raise ChatTemplateError(f"chat template did not finish within {timeout_s} s")
        result.setdefault("error", ChatTemplateError(f"chat template did not finish within {timeout_s} s"))
    if "error" in result:
        raise result["error"]
    if "text" not in result:
        raise ChatTemplateError(f"chat template stopped without output after {time.monotonic() - start:.2f} s")
    return result["text"]


_MARK = re.compile("\ue000(\\d+)\ue001")


def _content_spans(tokenizer, messages: list[dict], add_generation_prompt: bool, text: str, kw: dict) -> list[tuple[int, int]]:
    """Where each message's content sits in the rendered `text`, found by rendering once more with
    private-use markers in place of the contents. Empty when the template transforms contents
    (the marked render, with the contents put back, is not `text`)."""
    contents = [m.get("content") if isinstance(m.get("content"), str) and m.get("content") else None for m in messages]
    if not any(contents):
        return []
    marked = [dict(m, content=f"\ue000{i}\ue001") if c else dict(m) for i, (m, c) in enumerate(zip(messages, contents))]
    try:
        skeleton = render_chat(tokenizer, marked, add_generation_prompt, **kw)
    except ChatTemplateError:
        return []
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = length = 0
    for m in _MARK.finditer(skeleton):
        index = int(m.group(1))
        content = contents[index] if index < len(contents) else None
        if content is None:
            return []
        parts.append(skeleton[pos : m.start()])
        length += m.start() - pos
        spans.append((length, length + len(content)))
        parts.append(content)
        length += len(content)
        pos = m.end()
    parts.append(skeleton[pos:])
    return spans if "".join(parts) == text else []


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **kw: Any) -> list[int]:
    """`render_chat` then `encode(add_special=False, parse_special=True)` (the template writes BOS
    itself where it wants one), except that special-token texts inside the messages' contents stay
    ordinary text: a user who types `<|im_end|>` cannot close their own turn. When the template
    transforms contents (so they cannot be located exactly), a conversation whose contents hold no
    special-token text is tokenized as llama.cpp's server does; one whose contents do is refused
    (ChatTemplateError), never tokenized with the user's special tokens live. Keyword arguments go
    to `render_chat`."""
    text = render_chat(tokenizer, messages, add_generation_prompt, **kw)
    spans = _content_spans(tokenizer, messages, add_generation_prompt, text, kw)
    if not spans:
        for m in messages:
            content = m.get("content")
            hit = _special_text_in(tokenizer, content) if isinstance(content, str) else None
            if hit is not None:
                raise ChatTemplateError(
                    f"a {m.get('role', 'message')!r} message contains the special-token text {hit!r}, and this "
                    "model's chat template changes message contents, so it cannot be kept as plain text")
    return tokenizer.encode(text, add_special=False, parse_special=True, literal_spans=spans)


def _special_text_in(tokenizer, content: str) -> str | None:
    """The first special-token text (control or user-defined) found inside `content`, or None."""
    for token_id in tokenizer.special_token_ids():
        piece = tokenizer.token_text(token_id)
        if piece and piece in content:
            return piece
    return None
