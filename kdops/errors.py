"""The one base class of errors a user can fix: bad data, a wrong label set, a missing or corrupt artifact,
a project file that does not parse, a server that is not there. The command line prints these as one line
and exits 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message says what is wrong and how to fix it."""


class LabelMismatch(UserError):
    """Data whose labels the teacher does not know (and the project file does not map)."""


class DataError(UserError):
    """Input data that cannot be used, with a message that says what to fix."""
