"""The guard's policy (guard.py) and the start-up exposure warning, as units; the HTTP behaviour is
in test_hostile_requests.py."""

from __future__ import annotations

import pytest
from orcd_server.commands.serve import exposure_warning
from orcd_server.guard import GuardPolicy, json_media_type_ok


@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1:8080", True), ("localhost", True), ("LOCALHOST:1", True), ("[::1]:8080", True), ("::1", True),
    ("evil.example", False), ("evil.example:8080", False), ("127.0.0.2", False), ("", False), (None, False),
    ("10.0.0.5:8080", False), ("worker.internal:8080", True),
])
def test_hosts_on_loopback(host, ok):
    policy = GuardPolicy(host="127.0.0.1", allowed_hosts=["worker.internal"])
    assert policy.host_ok(host) is ok


def test_wildcard_bind_accepts_ip_literals_but_not_names():
    policy = GuardPolicy(host="0.0.0.0")
    assert policy.host_ok("10.0.0.5:8080") and policy.host_ok("[fe80::1]:80") and policy.host_ok("localhost")
    assert not policy.host_ok("rebind.attacker.test:8080") and not policy.host_ok("0.0.0.0.attacker.test")


def test_allowed_host_star_turns_the_check_off():
    assert GuardPolicy(allowed_hosts=["*"]).host_ok("anything.example")


def test_origins():
    policy = GuardPolicy(allowed_origins=["https://app.example/"])
    assert policy.origin_ok("https://app.example", "127.0.0.1:8080")
    assert policy.origin_ok("http://127.0.0.1:8080", "127.0.0.1:8080")  # the worker's own
    assert not policy.origin_ok("http://127.0.0.1:3000", "127.0.0.1:8080")
    assert not policy.origin_ok("null", "127.0.0.1:8080")
    assert GuardPolicy(allowed_origins=["*"]).origin_ok("http://any.example", None)


@pytest.mark.parametrize("value,ok", [
    ("application/json", True), ("application/json; charset=utf-8", True), ('application/json;charset="UTF-8"', True),
    ("application/merge-patch+json", True), ("APPLICATION/JSON", True), ("application/json; charset=latin-1", False),
    ("text/plain", False), ("text/json", False), ("application/jsonx", False), ("", False),
])
def test_json_media_types(value, ok):
    assert json_media_type_ok(value) is ok


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("localhost", None) is None
    assert exposure_warning("::1", None) is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert "without an API key" in exposure_warning("192.168.1.4", None)
    assert exposure_warning("0.0.0.0", "secret") is None
