"""The one error hierarchy: every failure a user can cause or fix is a :class:`GroundupError`.

The CLI prints such an error as one line (``groundup: <message>``) and exits non-zero, with the traceback
only under ``--debug``; anything else that escapes is a bug and keeps its traceback. A message names the
input that is wrong (a setting, a file, a URL, a device) and, where there is one, the fix, so a user never
needs the traceback to act on it.

The subclasses say *what kind* of input failed, so callers can react to a kind (a flow does not retry a
:class:`SettingsError`; a download retries only a :class:`SourceUnreachable` that is transient) and the
CLI can choose the exit code:

========================  =====================================================  =========
class                     raised for                                             exit code
========================  =====================================================  =========
``SettingsError``         an unknown/invalid setting or settings that conflict   2
``InputDataError``        a file or dataset whose content is unusable            1
``SourceUnreachable``     a URL/host/hub that cannot be reached or refuses       1
``ModelError``            a checkpoint, adapter or registered model unusable     1
``DeviceError``           an accelerator, precision or quantization not there    1
========================  =====================================================  =========

Subclasses are also ``ValueError``/``RuntimeError`` where the old per-module errors were, so code that
caught those keeps working.
"""

from __future__ import annotations


class GroundupError(Exception):
    """An expected failure with a complete, one-line message for the user."""

    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message}; {fix}" if fix else message)


class SettingsError(GroundupError, ValueError):
    """A setting is unknown, invalid, or cannot work with another one."""

    exit_code = 2


class InputDataError(GroundupError, ValueError):
    """An input file or dataset exists but its content cannot be used (encoding, schema, empty, ...)."""


class SourceUnreachable(GroundupError, RuntimeError):
    """A source (URL, host, model hub) cannot be reached, or refuses the request.

    ``transient`` says whether trying again later can help (a timeout, a 5xx, a cut body) or not (a name
    that does not resolve, a 404, a refused connection on loopback), so retries stop on the permanent ones.
    """

    def __init__(self, message: str, *, fix: str | None = None, transient: bool = False) -> None:
        super().__init__(message, fix=fix)
        self.transient = transient


class ModelError(GroundupError, ValueError):
    """A checkpoint, adapter or registered model is missing, malformed, or does not fit the settings."""


class DeviceError(GroundupError, ValueError):
    """The requested accelerator, device count, precision or quantization is not available here."""


def one_line(error: BaseException) -> str:
    """The message a user sees for ``error``: its first line, with the error type only for non-groundup
    errors that reached the user anyway (Prefect's own failure messages, say)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if isinstance(error, GroundupError) else f"{type(error).__name__}: {text}"
