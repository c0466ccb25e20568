"""The one exception type for input a user can fix: a file, a flag, a value, a folder.

Its message is one line that names where (the file and line, the flag, the key) and what was expected.
The example scripts print it alone on stderr and exit with status 2 (minitune.train.run_main); any other
exception is a bug and keeps its traceback. It is a ValueError, so `except ValueError` still catches it.
Beside it, the two tests the checks of a user's numbers share.
"""

import numbers


class UserError(ValueError):
    """Bad input a user can fix; the message says where and what was expected, in one line."""


def is_int(value) -> bool:
    """An integer count or id: Python's or numpy's, but not a bool (True is no count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number, int or float, Python's or numpy's, but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
