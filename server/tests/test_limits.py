"""Each request limit has one home: the server's schemas take the engine's where both enforce one."""

from __future__ import annotations

import msgspec
import pytest

from orcd_core.generation import MAX_STOP_STRINGS
from orcd_server import schemas


def test_stop_strings_limit_is_the_engines():
    ok = {"job_id": "j", "prompt": "x", "stop": ["a"] * MAX_STOP_STRINGS}
    assert len(schemas.decode(msgspec.json.encode(ok), schemas.ExecuteRequest).stop) == MAX_STOP_STRINGS
    with pytest.raises(schemas.RequestError) as exc:
        schemas.decode(msgspec.json.encode({**ok, "stop": ["a"] * (MAX_STOP_STRINGS + 1)}), schemas.ExecuteRequest)
    assert exc.value.body()["error"]["field"] == "stop"
