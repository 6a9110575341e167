"""Transition only (issue 14): the helper moved to tests/helpers/tiny_bundle.py; import it from
there. Kept so tests written before the move still import; remove after the merge."""

from helpers.tiny_bundle import *  # noqa: F403
