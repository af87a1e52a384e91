"""`engine.validate_request`: each refusal carries the field at fault (the server reads it from there,
never from the message text)."""

from __future__ import annotations

import pytest

from orcd_core.engine import validate_request
from orcd_core.generation import MAX_STOP_STRINGS, GenerationRequest, InvalidRequest, SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt="x", max_tokens=-1), "max_tokens"),
    (dict(prompt="x", sampling=SamplingParams(temperature=-1)), "temperature"),
    (dict(prompt="x", sampling=SamplingParams(top_p=1.5)), "top_p"),
    (dict(prompt="x", sampling=SamplingParams(min_p=-0.1)), "min_p"),
    (dict(prompt="x", sampling=SamplingParams(top_k=-1)), "top_k"),
    (dict(prompt="x", sampling=SamplingParams(repetition_penalty=0)), "repetition_penalty"),
    (dict(prompt="x", sampling=SamplingParams(seed=-1)), "seed"),
    (dict(prompt="x", stop=("",)), "stop"),
    (dict(prompt="x", stop=("a",) * (MAX_STOP_STRINGS + 1)), "stop"),
    (dict(), None),
])
def test_refusals_name_their_field(kwargs, field):
    with pytest.raises(InvalidRequest) as exc:
        validate_request(GenerationRequest(**kwargs))
    assert exc.value.details["field"] == field


def test_the_stop_limit_is_allowed():
    validate_request(GenerationRequest(prompt="x", stop=("a",) * MAX_STOP_STRINGS))
