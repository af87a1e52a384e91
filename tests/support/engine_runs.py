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


def run_together(engine, requests) -> list[list]:
    """The GeneratedTokens of each request, all submitted at once to the engine's scheduler (decoded
    together, continuous batching), in the order of `requests`."""
    sched = engine.scheduler
    seqs = [sched.submit(engine.prepare(r)) for r in requests]
    got = {id(s): [] for s in seqs}
    while sched.busy:
        for seq, event in sched.step():
            if hasattr(event, "logprobs"):  # a GeneratedToken (not the result or an error)
                got[id(seq)].append(event)
    return [got[id(s)] for s in seqs]
