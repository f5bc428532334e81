"""The one exception type for mistakes a user can fix.

Entry points print its message as a single line and exit non-zero; everything else is a bug and
keeps its traceback. The message names the problem and the fix.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """A bad config value, a missing or malformed file, an unusable prompt, ..."""


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, also when a framework re-raised it wrapped in its own type."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For entry scripts: a UserError prints `error: <message>` and exits 2; a bug keeps its traceback."""
    try:
        yield
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)
