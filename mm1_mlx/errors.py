"""The one exception type the command line turns into a one-line message."""


class UserError(Exception):
    """Bad input from the user (a path, a file, a flag): the message is shown as it is."""
