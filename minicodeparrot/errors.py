"""The one exception type for mistakes a user can fix.

Library code raises `UserError` (or a subclass) with a one-line message that names the problem
and the fix. The CLI prints that line and exits with status 2 -- no traceback, because a
traceback for a wrong path or a bad flag buries the one sentence the user needs.
Programming errors stay ordinary exceptions and keep their tracebacks.
"""


class UserError(Exception):
    """A mistake in the user's input: a bad path, a malformed file, an impossible option."""
