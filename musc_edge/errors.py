"""The one base class of every error meant for a user rather than a developer.

Anything raised as a `MuscEdgeError` carries a message that says what is wrong and what to
do; the command line prints it on one line and exits 2. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations


class MuscEdgeError(Exception):
    """A problem the user can fix (bad input, missing weights, damaged package, ...)."""


class UsageError(MuscEdgeError, ValueError):
    """A setting, option or argument outside what the code accepts."""
