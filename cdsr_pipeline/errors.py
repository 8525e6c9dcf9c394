"""Errors about what a user asked for (shown as one line by the ``cdsr`` command, never a traceback)."""


class UserInputError(ValueError):
    """A request that names something that does not exist or is out of range."""
