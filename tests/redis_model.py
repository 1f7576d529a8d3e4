"""Old import path of :mod:`helpers.redis_model` (``from redis_model import ...`` keeps working)."""

from __future__ import annotations

from helpers.redis_model import *  # noqa: F403
from helpers.redis_model import __all__ as __all__
