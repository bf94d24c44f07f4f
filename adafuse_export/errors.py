"""The one user-facing exception type.

Anything the user can fix (a path, a tensor, an option) raises AdafuseError with a
single line naming the input, what was expected and what was found. The CLI prints
that line and exits non-zero without a traceback; other exceptions are bugs and
keep their traceback.
"""


class AdafuseError(Exception):
    """A problem with the user's input, reported as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def missing_dependency(package: str, extra: str | None = None) -> AdafuseError:
    hint = f"pip install 'adafuse-export[{extra}]'" if extra else f"pip install {package}"
    return AdafuseError(f"this command needs the Python package '{package}', which is not installed; install it with: {hint}")
