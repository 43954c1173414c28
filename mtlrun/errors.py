"""The one exception type whose message is shown to the user as a single line."""


class MtlrunError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""
