"""User errors: bad input a person can fix, reported by the scripts as one line instead of a traceback."""
import functools
import sys


class UserError(ValueError):
    """Bad input (a file, a folder, a flag): the message names it, says what is wrong and what to do."""


class RunEnded(RuntimeError):
    """A run that ended before its end for the reason the message gives (e.g. too many non-finite steps)."""


# Also user errors when they reach a script's entry point: paths that are missing, taken or unreadable.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def report_user_errors(main):
    """Wrap a script's main so that a user error or an ended run ends the process with `error: MESSAGE` and exit
    code 1, and Ctrl-C with one line and exit code 130."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, RunEnded, *PATH_ERRORS) as error:
            sys.exit(f"error: {error}")
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C); a training run continues from its newest checkpoint with "
                  "--resume-latest", file=sys.stderr)
            sys.exit(130)
    return wrapper
