"""Transition only (issue 14): the helper moved to tests/helpers/tiny_gemma3.py; import it from
there. Kept so tests written before the move still import; remove after the merge."""

from helpers.tiny_gemma3 import *  # noqa: F403
