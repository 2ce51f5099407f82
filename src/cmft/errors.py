"""The one error type for bad input. The CLI turns it into one line on stderr and exit status 2."""

from __future__ import annotations


class CmftError(Exception):
    """Bad input from the user: a config, a data file, a path. The message says what to do next."""

    exit_code = 2
    keeps_run = False
    """True when the unfinished run folder must survive the error (e.g. to `--resume` it)."""
