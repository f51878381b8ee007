"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class FP8MixError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
