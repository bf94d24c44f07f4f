"""The one user-facing exception type, and the one escaping of what is printed.

Anything the user can fix (a path, a tensor, an option) raises AdafuseError with a
single line naming the input, what was expected and what was found. The CLI prints
that line and exits non-zero without a traceback; other exceptions are bugs and
keep their traceback.

Strings that come from a file or an argument (paths, tensor names, model_type, metadata, option
values) can hold newlines, which would forge lines of a report ("wrote ... verified", "PASSED"),
and ESC sequences, which would drive the terminal. `shown` escapes every control, format and
line-separator character the way Python's repr does (\\n, \\x1b, \\u2028); AdafuseError messages
pass through it, and the CLI prints every other line through it (cli/options.py `emit`).
"""
import unicodedata

_ESCAPED = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def _escape(c: str) -> str:
    return c.encode("unicode_escape", "backslashreplace").decode("ascii") if unicodedata.category(c) in _ESCAPED else c


def shown(value: object) -> str:
    """str(value) as one printable line: control, format and line-separator characters escaped, the rest kept."""
    text = str(value)
    return text if text.isprintable() else "".join(map(_escape, text))


class AdafuseError(Exception):
    """A problem with the user's input, reported as one line."""

    def __init__(self, message: str):
        super().__init__(shown(message))  # always one line, nothing from an input reaches the terminal raw


def missing_dependency(package: str, extra: str | None = None) -> AdafuseError:
    hint = f"pip install 'adafuse-export[{extra}]'" if extra else f"pip install {package}"
    return AdafuseError(f"this command needs the Python package '{package}', which is not installed; install it with: {hint}")
