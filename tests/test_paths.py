"""Request-path hygiene: what could make the gateway and an upstream disagree is a 400."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.policy import load_policy
from gateway.pipeline.paths import safe_path
from gateway.protocol.errors import InvalidRequest

SHIPPED = Path(__file__).resolve().parent.parent / "policies" / "anaplan.yaml"


def refused(raw_path: str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        safe_path(raw_path)
    assert info.value.status == 400
    assert info.value.error == "invalid_request"
    return info.value


@pytest.mark.parametrize(
    "raw_path",
    [
        # dot-segments, plain and percent-encoded (RFC 3986 section 5.2.4)
        "/a/../b",
        "/a/./b",
        "/..",
        "/a/..",
        "/a/.",
        "/%2e%2e/x",
        "/%2E%2E/x",
        "/a/%2E/b",
        "/a/.%2e/b",
        "/a/%2e./b",
        "/2/0/workspaces/W/models/M/%2e%2e/%2e%2e/%2e%2e/%2e%2e/scim/1/0/v2/Users",
        # encoded slash and backslash
        "/a%2fb",
        "/a%2Fb",
        "/a/%2F..%2Fb",
        "/a%5cb",
        "/a%5Cb",
        # raw backslash
        "/a\\b",
        "/a\\..\\b",
        # NUL and other control characters, raw or encoded
        "/a%00b",
        "/a\x00b",
        "/a%0ab",
        "/a%0D%0AHost:%20evil",
        "/a\tb",
        "/a%1fb",
        "/a%7fb",
        # double encoding
        "/%252e%252e/x",
        "/a%252fb",
        "/a%255cb",
        "/a%2500b",
        # not an absolute path
        "a/b",
        "",
        "*",
        "http://evil.test/a",
    ],
)
def test_ambiguous_paths_are_refused_with_400(raw_path: str) -> None:
    refused(raw_path)


def test_the_reason_is_told() -> None:
    assert "dot-segment" in refused("/a/../b").description
    assert "encoded slash" in refused("/a%2fb").description
    assert "control character" in refused("/a%0ab").description


@pytest.mark.parametrize(
    ("raw_path", "decoded"),
    [
        ("/", "/"),
        ("/2/0/workspaces", "/2/0/workspaces"),
        ("/a/b%20c", "/a/b c"),
        ("/a/%41%42", "/a/AB"),
        ("/caf%C3%A9", "/café"),
        ("/a//b", "/a//b"),
        ("/a/.../b", "/a/.../b"),        # three dots is an ordinary segment
        ("/a/..b/.c", "/a/..b/.c"),
        ("/a/b.", "/a/b."),
        ("/a%25zz", "/a%zz"),            # a literal percent sign, not double encoding
        # the query string (and a fragment) play no part in the path
        ("/a/b?x=1", "/a/b"),
        ("/a?next=/../../etc/passwd", "/a"),
        ("/a?x=%2f%00%252e", "/a"),
        ("/a#/../b", "/a"),
    ],
)
def test_ordinary_paths_are_decoded(raw_path: str, decoded: str) -> None:
    assert safe_path(raw_path) == decoded


def test_traversal_cannot_reach_another_family_of_the_shipped_policy() -> None:
    policy = load_policy(SHIPPED)
    # were it decoded and normalised, this would be a SCIM write on a models-write route
    raw = "/2/0/models/M/%2e%2e/%2e%2e/%2e%2e/scim/1/0/v2/Users"
    refused(raw)
    assert policy.match("POST", safe_path("/scim/1/0/v2/Users")).route is not None


@pytest.mark.parametrize("raw_path", ["/a%ff", "/a%C3", "/%80"])
def test_invalid_utf8_is_refused_with_400(raw_path: str) -> None:
    refused(raw_path)


@pytest.mark.parametrize("raw_path", ["/a/..;/b", "/a/.;x=1/b", "/a/%2e%2e;/b", "/a/..%3b/b"])
def test_dot_segments_with_path_parameters_are_refused(raw_path: str) -> None:
    refused(raw_path)
