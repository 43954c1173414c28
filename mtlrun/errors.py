"""The exception whose message is shown to the user as a single line."""


class MtlrunError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""

    def __str__(self) -> str:
        text = super().__str__()
        # A DataLoader worker's error comes back re-raised with the worker's traceback as its message;
        # the user's line is the traceback's last one.
        prefix = f"{MtlrunError.__module__}.{MtlrunError.__name__}: "
        if text.startswith("Caught MtlrunError") and prefix in text:
            return text.rsplit(prefix, 1)[1].strip()
        return text
