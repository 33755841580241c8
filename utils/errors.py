"""User errors: bad input a person can fix, reported by the scripts as one line instead of a traceback."""
import functools
import sys


class UserError(ValueError):
    """Bad input (a file, a folder, a flag): the message names it, says what is wrong and what to do."""


# Also user errors when they reach a script's entry point: paths that are missing, taken or unreadable.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def report_user_errors(main):
    """Wrap a script's main so that a user error ends the process with `error: MESSAGE` and exit code 1."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, *PATH_ERRORS) as error:
            sys.exit(f"error: {error}")
    return wrapper
