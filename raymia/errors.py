"""Errors a user can cause and fix themselves (bad config, missing files, impossible resource requests).

The CLI turns a :class:`UserError` into a short message and exit code 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem in the user's input. ``str(err)`` names the field or file and the fix."""

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)
