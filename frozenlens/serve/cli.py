"""Moved to :mod:`frozenlens.cli.serve` (the CLI package holds every command family).

Only ``add_remote_args`` and ``remote_source`` are re-exported, for the callers
that still import them from here; import them from :mod:`frozenlens.cli.serve`.
"""

from frozenlens.cli.serve import add_remote_args, remote_source

__all__ = ["add_remote_args", "remote_source"]
