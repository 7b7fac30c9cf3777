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


def disk_full(e: BaseException) -> str | None:
    """What filled up, when ``e`` (or what caused it) is a full disk, a quota or a file-size limit: OSError's
    errno, or the "(os error N)" / strerror text libraries such as safetensors and MLflow wrap it in."""
    import errno
    import os
    import re

    codes = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in codes:
            return f"{e.filename or 'a file'} ({e.strerror})"
        text = str(e)
        m = re.search(r"os error (\d+)", text)
        if m and int(m.group(1)) in codes:
            return os.strerror(int(m.group(1)))
        for code in codes:
            if os.strerror(code) in text:
                return os.strerror(code)
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None
