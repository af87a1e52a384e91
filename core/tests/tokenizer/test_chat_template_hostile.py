"""Chat templates read from a model file are untrusted (issue 16). With the default limits, each
payload below is refused or stopped within the 1 s time limit, its error message is short, and,
above all, no single C call holds the GIL: a heartbeat thread (standing for the event loop that
answers /health) keeps ticking. The payloads marked "found" stalled the heartbeat for 2 to 27 s
before the integer, format-width and raise_exception guards of chat.py (measured in
docs/reliability.md)."""

from __future__ import annotations

import threading
import time

import pytest

from orcd_core.errors import ChatTemplateError
from orcd_core.tokenizer.chat import DEFAULT_TIMEOUT_S, render_chat

MAX_GAP_S = 0.3  # the longest the heartbeat may be starved (a busy 2-core box schedules late sometimes)
MAX_MESSAGE_CHARS = 1000

PAYLOADS = {
    # sandbox escapes
    "mro subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "attr filter walk": "{{ (''|attr('__class__')|attr('__mro__'))[1]|attr('__subclasses__')() }}",
    "cycler globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner globals": "{{ joiner.__init__.__globals__ }}",
    "namespace globals": "{{ namespace.__init__.__globals__ }}",
    "lipsum globals": "{{ lipsum.__globals__['os'] }}",
    "format field walk": "{{ '{0.__class__.__mro__}'.format('') }}",
    # size and time
    "huge range": "{% for i in range(10**9) %}x{% endfor %}",
    "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string multiplication": "{{ 'x' * 10**9 }}",
    "string doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "exponential macro": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}x{% endif %}{% endmacro %}{{ f(40) }}",
    "deep if nesting": "{% if true %}" * 500 + "x" + "{% endif %}" * 500,
    "deep parentheses": "{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}",
    # found: one C call holding the GIL, or a huge error body
    "found: integer squaring": (
        "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x > 1 }}"
    ),
    "found: power chain": "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x ** 60 %}{% endfor %}",
    "found: printf width": "{{ '%0999999999d' % 1 }}",
    "found: printf precision": "{{ '%.999999999f' % 1.5 }}",
    "found: format filter width": "{{ '%0999999999d'|format(1) }}",
    "found: str.format width": "{{ '{:>999999999}'.format(1) }}",
    "found: raise_exception 1 MB": "{{ raise_exception('A' * 999999) }}",
}


class _Tok:
    bos_text = eos_text = ""


def _heartbeat(stop: threading.Event, out: dict) -> None:
    last = time.perf_counter()
    worst = 0.0
    while not stop.is_set():
        time.sleep(0.005)
        now = time.perf_counter()
        worst = max(worst, now - last - 0.005)
        last = now
    out["gap"] = worst


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_hostile_template_is_refused_in_time_without_stalling(name):
    stop, beat = threading.Event(), {}
    ticker = threading.Thread(target=_heartbeat, args=(stop, beat))
    ticker.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ChatTemplateError) as info:
            text = render_chat(_Tok(), [{"role": "user", "content": "Hi"}], template=PAYLOADS[name])
            assert "class" not in text and "os" not in text  # a rendered escape must show nothing
            raise ChatTemplateError("rendered")  # a payload that renders harmlessly is fine too
    finally:
        elapsed = time.perf_counter() - t0
        stop.set()
        ticker.join()
    assert elapsed <= DEFAULT_TIMEOUT_S + 0.5, f"{name}: {elapsed:.2f} s"
    assert beat["gap"] < MAX_GAP_S, f"{name}: the GIL was held {beat['gap']:.2f} s in one go"
    assert len(str(info.value)) <= MAX_MESSAGE_CHARS, f"{name}: a {len(str(info.value))}-character message"


def test_the_guards_leave_ordinary_arithmetic_and_formatting_alone():
    template = "{{ 2 ** 64 }} {{ 12345 * 67890 }} {{ '%5d|%.2f' % (7, 1.5) }} {{ '{:>4}'.format('a') }} {{ '%03d'|format(5) }}"
    assert render_chat(_Tok(), [], template=template) == "18446744073709551616 838102050     7|1.50    a 005"


def test_worker_thread_keeps_serving_after_hostile_templates():
    for name in ("found: integer squaring", "nested ranges", "found: printf width"):
        with pytest.raises(ChatTemplateError):
            render_chat(_Tok(), [{"role": "user", "content": "Hi"}], template=PAYLOADS[name])
    text = render_chat(_Tok(), [{"role": "user", "content": "Hi"}])  # the ChatML fallback
    assert text.endswith("<|im_start|>assistant\n")
