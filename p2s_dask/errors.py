"""Exceptions with one-line messages meant for the user."""


class InputError(ValueError):
    """Bad input: the message says what is wrong in one line."""
