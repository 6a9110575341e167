"""Transition only (issue 14): the helper moved to tests/helpers/board_peers.py; import it
from there. Kept so tests written before the move still import; remove after the merge."""

from helpers.board_peers import *  # noqa: F403
