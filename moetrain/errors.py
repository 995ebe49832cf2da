"""The one exception type for bad user input (config, data, checkpoint, CLI).

The CLI prints its message without a traceback and exits with code 2.
"""


class UserError(Exception):
    """Bad input from the user; the message names the field, the value and the fix."""

    exit_code = 2
