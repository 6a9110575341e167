"""Transition only (issue 14): the helper moved to tests/helpers/tiny_siglip.py; import it from
there. Kept so tests written before the move still import; remove after the merge."""

from helpers.tiny_siglip import *  # noqa: F403
