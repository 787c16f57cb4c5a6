"""One exception type for problems a user can fix; the CLI prints its message without a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the input and says how to fix it."""
