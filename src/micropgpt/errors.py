"""The one exception type for mistakes a user can fix.

Entry points print its message as a single line and exit non-zero; everything else is a bug and
keeps its traceback. The message names the problem and the fix.
"""


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
