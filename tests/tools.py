"""The outside programs some tests drive: found, or the test skips saying what to install.

In CI (``GATEWAY_TEST_TOOLS_REQUIRED=1``, set by ``.ci/run`` after it installs them) a
missing program fails the test instead, so a tool that did not install cannot hide a
whole group of tests behind a skip. The chart tests have their own switch of the same
kind, ``CHART_TOOLS_REQUIRED``.
"""

from __future__ import annotations

import os
import shutil

import pytest


def required() -> bool:
    """Whether a missing tool fails the test (CI) rather than skipping it."""
    return os.environ.get("GATEWAY_TEST_TOOLS_REQUIRED") == "1"


def missing(reason: str) -> None:
    """Skip, or fail under ``GATEWAY_TEST_TOOLS_REQUIRED=1``, naming what is missing."""
    if required():
        pytest.fail(f"{reason} (GATEWAY_TEST_TOOLS_REQUIRED=1: tools are not optional here)")
    pytest.skip(reason)


def find(*names: str, install: str) -> str:
    """The path of the first of ``names`` on PATH; else :func:`missing`."""
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    missing(f"{' or '.join(names)} not found: {install}")
    raise AssertionError("unreachable")  # missing() always raises
