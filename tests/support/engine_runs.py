"""Driving an Engine in tests: one request run to its end."""

from __future__ import annotations


def collect(engine, request, cancel=None):
    """(the tokens `engine.run` yields, the GenerationResult it returns) for one request."""
    gen = engine.run(engine.prepare(request), cancel)
    tokens = []
    while True:
        try:
            tokens.append(next(gen))
        except StopIteration as done:
            return tokens, done.value
