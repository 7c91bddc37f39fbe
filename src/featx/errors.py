"""Errors that featx reports to the user as one line, without a traceback."""


class FeatxError(Exception):
    """A user mistake or an unusable input; the message says what to do about it."""


class BadImage(Exception):
    """An image that cannot be decoded; it is skipped and recorded, never fatal."""
