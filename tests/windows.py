"""Old import path of the window arithmetic, now public in :mod:`aiometer_redis.testing`.

New tests import from ``aiometer_redis.testing``; this module keeps ``from windows import ...``
working in tests written before the move.
"""

from __future__ import annotations

from aiometer_redis.testing import max_in_window, max_overlap, over_limit_seconds, window_violations

__all__ = ["max_in_window", "max_overlap", "over_limit_seconds", "window_violations"]
