"""The one exception type whose message is meant for the user: the CLI prints it in one line."""


class PerpflowError(Exception):
    """An error the user can act on; the message says what happened and what to do."""
