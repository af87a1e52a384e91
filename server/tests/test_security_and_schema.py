"""API-key collection and comparison (security.py), and that the OpenAPI document (openapi_doc.py)
describes every route of the app with the Struct its handler decodes."""

from __future__ import annotations

import pytest
from fake_engine import FakeEngine
from orcd_server import openai_api, openapi_doc, schemas
from orcd_server.app import ServerSettings, create_app
from orcd_server.security import ApiKeyError, collect_keys, key_matches


def test_collect_keys(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\nk2\n\n k3 \nk1\n")
    assert collect_keys(["k1"], [str(f)], environ={"ORCD_API_KEY": "k4"}) == ("k1", "k2", "k3", "k4")
    assert collect_keys([], [], environ={}) == ()
    with pytest.raises(ApiKeyError, match="holds no key"):
        (tmp_path / "empty").write_text("# nothing\n")
        collect_keys([], [str(tmp_path / "empty")], environ={})
    with pytest.raises(ApiKeyError, match="cannot be read"):
        collect_keys([], [str(tmp_path / "missing")], environ={})
    with pytest.raises(ApiKeyError, match="empty"):
        collect_keys([" "], [], environ={})


def test_key_matches():
    keys = (b"alpha", b"beta")
    assert key_matches(b"beta", keys) and key_matches(b"alpha", keys)
    assert not key_matches(b"bet", keys) and not key_matches(b"betax", keys) and not key_matches(None, keys)


def test_every_route_is_documented_with_its_request_struct():
    app = create_app(ServerSettings(worker_id="w", model_ref="m.gguf"), FakeEngine.loader())
    served = {(method.lower(), route.path) for route in app.routes for method in getattr(route, "methods", ())
              if method not in ("OPTIONS", "HEAD") and not route.path.startswith("/schema")}
    assert served == set(openapi_doc.OPERATIONS)
    doc = openapi_doc.document()
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    comps = doc["components"]["schemas"]
    for struct in (schemas.ExecuteRequest, openai_api.ChatCompletionRequest, openai_api.TokenizeRequest):
        assert set(comps[struct.__name__]["properties"]) == set(struct.__struct_fields__)


def test_readme_and_docs_curl_bodies_are_valid_requests():
    """The bodies of the curl examples (README.md, docs/http_api.md) decode with the Struct of the
    endpoint they are sent to, strictly for /execute."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    struct_of = {"/execute": schemas.ExecuteRequest, "/v1/chat/completions": openai_api.ChatCompletionRequest}
    seen = set()
    for page in (root / "README.md", root / "docs" / "http_api.md"):
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        for path, body in re.findall(r"curl [^\n]*?http://127\.0\.0\.1:8080(/[\w/]+)[^\n]*?-d '([^']+)'", text):
            schemas.decode(body.encode(), struct_of[path])
            seen.add((page.name, path))
    assert seen == {(p, e) for p in ("README.md", "http_api.md") for e in struct_of}
