"""``python -m aiometer_redis``: the same command line as ``aiometer-redis``."""

from ._cli import main

main()
