"""One exception for bad input: the CLI prints its message and exits non-zero, writing no result."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed checkpoint, a corrupt image.

    The message must name the file involved and say how to fix it.
    """

    def __init__(self, message: str, *, path=None, fix: str | None = None):
        parts = [message]
        if path is not None:
            parts.append(f"file: {path}")
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__("\n  ".join(parts))
        self.message = message
        self.path = path
        self.fix = fix
