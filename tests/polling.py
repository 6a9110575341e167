"""Transition only (issue 14): the helper moved to tests/helpers/polling.py; import it from
there. Kept so tests written before the move still import; remove after the merge."""

from helpers.polling import *  # noqa: F403
