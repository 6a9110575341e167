"""Transition only (issue 14): the helper moved to tests/helpers/jetson_profiles.py; import it from
there. Kept so tests written before the move still import; remove after the merge."""

from helpers.jetson_profiles import *  # noqa: F403
