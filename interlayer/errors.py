"""The one exception type for mistakes a user can fix.

The command line catches :class:`UserError`, prints its message as one line and exits with code 2, without
a traceback. Bugs raise anything else and keep their traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (a wrong site, a missing file, a bad shape); the message says what to do."""
