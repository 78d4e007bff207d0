"""Errors that the command line reports as one line with exit status 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix.

    The CLI prints ``langneurons: error: <message>`` on stderr and exits with status 2,
    without a traceback. Library callers get an ordinary exception.
    """
