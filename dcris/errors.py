"""The project's one exception type for user mistakes: the command line reports it in one line."""


class UserError(Exception):
    """A mistake in what the user gave (a path, a config, an input): reported as ``error: ...``, exit 2."""
