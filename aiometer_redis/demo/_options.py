"""The demo's options that depend on one another, settled once for every role."""

from __future__ import annotations

import argparse

__all__ = ["settle_options"]


def settle_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on ``--target-capacity`` and refuse what contradicts.

    Against a target with a capacity of its own the workers are configured far above it (100
    starts/s, 16 at once), so that only the push-back can bring them down to it.

    Raises:
        CommandError: ``--no-adaptive`` without ``--target-capacity`` (exit status 2).
    """
    from .._cli import EXIT_USAGE, CommandError

    pushback = getattr(args, "target_capacity", None) is not None
    if getattr(args, "no_adaptive", False) and not pushback:
        raise CommandError(
            "--no-adaptive needs --target-capacity (without a target that pushes back there "
            "is nothing to adapt to)",
            EXIT_USAGE,
        )
    if args.max_at_once is None:
        args.max_at_once = 16 if pushback else 8
    if args.max_per_second is None:
        args.max_per_second = 100.0 if pushback else 40.0
    return args
