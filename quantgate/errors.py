"""Every error quantgate raises on purpose, in one place.

Each message says what was expected, what was found, and what to do. The CLI maps these
types to exit codes (see ``exit_code``); library code never prints or exits.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from typing import TypeVar

_Error = TypeVar("_Error", bound="QuantgateError")


class QuantgateError(Exception):
    """Base class: an error a user can act on (bad input, failed check, refused bundle).
    Pickled whole, every attribute with it (a worker process's error sent to its parent),
    whatever its class's __init__ takes."""

    exit_code = 2  # bad usage or bad input

    def __reduce__(self):
        return _restored, (type(self), self.args, self.__dict__)

    @classmethod
    def logged(
        cls: type[_Error],
        what: str,
        err: BaseException,
        log: logging.Logger,
        *,
        trace: bool = False,
        level: int = logging.ERROR,
    ) -> _Error:
        """A server's answer that keeps ``err``'s words to the server: ``what`` failed, the
        exception's type and an error id, while ``log`` gets the whole message under that id
        (with its traceback where ``trace``, for a bug). ONNX Runtime's messages name the
        graph's nodes and the source paths it was built from: the operator's to read, not
        every client's."""
        ref = secrets.token_hex(4)
        log.log(
            level, "%s, error %s: %s: %s", what, ref, type(err).__name__, err,
            exc_info=err if trace else None,
        )  # fmt: skip
        return cls(f"{what} ({type(err).__name__}); the server's log has the details: error {ref}")


def _restored(cls: type[QuantgateError], args: tuple, state: dict) -> QuantgateError:
    """An error as pickled (``QuantgateError.__reduce__``): its args and attributes, set
    without its __init__, whose parameters differ by class (ConnectionFailed's cause and
    what could not be read back: a multiprocessing pool broke on the first one)."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigError(QuantgateError):
    """An invalid configuration value (for example d_model not divisible by n_heads).

    ``problems``: where a config refused values of its fields, (field, what is wrong with
    its value) for each, which the message says as "field what" ("min_cosine 1.5: expected
    -1..1" is ``("min_cosine", "1.5: expected -1..1")``), so that a caller that took the
    value from elsewhere (a command-line flag, a file) can name it so; empty otherwise."""

    def __init__(self, message: str, problems: Iterable[tuple[str, str]] = ()):
        super().__init__(message)
        self.problems = tuple(problems)


class ConfigTypeError(ConfigError, TypeError):
    """A config made with a keyword that is none of its fields, or another type where a config
    is expected: a ConfigError, and the TypeError Python raises for those."""


class CheckpointError(QuantgateError):
    """A checkpoint that is missing, unreadable, or inconsistent with its config."""


class ModelLoadError(QuantgateError):
    """A model spec (checkpoint, ``pkg.mod:factory`` or Hugging Face directory) that cannot be loaded."""


class ExportError(QuantgateError):
    """PyTorch -> ONNX export failed."""


class ValidationError(ExportError):
    """The exported ONNX model does not match PyTorch; ``failures`` lists every mismatch."""

    exit_code = 3

    def __init__(self, message: str, failures: list[str] | None = None):
        self.summary = message  # what failed, without the list
        self.failures = list(failures or [])
        if self.failures:
            message = message + "\n" + "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(message)


class DataError(QuantgateError):
    """Calibration or evaluation data that cannot be read or does not fit the model."""


class QuantizeError(QuantgateError):
    """Quantization itself failed (not a gate: the model could not be produced)."""


class NothingToQuantize(QuantizeError):
    """A recipe found no node of the kinds it quantizes: not applicable to this graph (a
    search tries the others), rather than failed."""


class QuantizeFailed(QuantizeError):
    """ONNX Runtime, or a converter, failed on a model quantgate made from input it accepted
    (a crash opening or running it, every recipe failing): the runtime's failure, not a
    mistake in the input (other recipes, or a newer onnxruntime, may do better)."""

    exit_code = 1  # not bad usage or input


class GateFailed(QuantgateError):
    """At least one gate failed. The bundle and its report were still written."""

    exit_code = 3

    def __init__(self, message: str, bundle_path: str):
        self.bundle_path = bundle_path  # where the failing bundle was written: qb.load it
        super().__init__(message)


class OutOfSpace(QuantgateError):
    """The filesystem a stage writes its working files to is full: not the model's fault, and
    no other exporter or recipe would do better."""

    exit_code = 1  # not the user's input: the machine's


class Busy(QuantgateError):
    """Another quantgate process is working towards writing the same path."""

    exit_code = 1  # not the user's input: wait, and run it again


class BundleError(QuantgateError):
    """A bundle that is missing, corrupt, tampered with, or refused (failed gates)."""


class BundleOutOfSpace(BundleError, OutOfSpace):
    """The bundle could not be written for want of room: a ``BundleError`` (nothing was
    changed at ``--out``) with a full disk's exit code."""


class CheckpointOutOfSpace(CheckpointError, OutOfSpace):
    """The checkpoint could not be written for want of room (nothing was changed at
    ``--out``): a full disk's exit code."""


class ServeError(QuantgateError):
    """The server cannot start with the given configuration."""


class DrainIncomplete(ServeError):
    """The server's shutdown grace ran out before every admitted request was answered."""

    exit_code = 1  # not the operator's input: the drain needed more time


class BadRequest(QuantgateError):
    """An inference request that does not fit the model (name, dtype, shape, size)."""


class ModelNotFound(BadRequest):
    """A request names a model or version the server does not serve."""


class Unavailable(QuantgateError):
    """The server cannot take the request now; ``reason`` says why, for the metrics: one of
    ``REASONS``, or empty where a client decoded the status."""

    exit_code = 1  # not the user's input: wait, and send it again
    REASONS = ("queue_full", "warming_up", "shutting_down", "timeout")

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class DeadlineExceeded(QuantgateError):
    """The request's deadline passed before it could run."""

    exit_code = 1  # not the user's input: a busy or slow server; send it again, or wait longer


class Cancelled(QuantgateError):
    """The client went away before its request was answered."""

    exit_code = 1


class Unauthenticated(QuantgateError):
    """The server wants a bearer token this call did not carry, or not this one."""


class ResponseTooLarge(QuantgateError):
    """A request's answer is larger than the server may send (--max-message-bytes)."""


class InferenceFailed(QuantgateError):
    """ONNX Runtime failed on a request that passed validation, or the server met a bug
    answering it (answered ``logged``)."""

    exit_code = 1  # the server's failure, not the request's


def exit_code(err: BaseException) -> int:
    """The process exit code for an error: 3 for failed gates/validation, 2 for bad input, 1 otherwise."""
    if isinstance(err, QuantgateError):
        return err.exit_code
    return 1


def clipped(text: str, limit: int, show: Callable[[str], str] = str) -> str:
    """``text`` as ``show`` writes it, cut past ``limit`` characters with its length said
    ("...(+19936 chars)"): a client's string in a message or a log line, whatever its size."""
    if len(text) <= limit:
        return show(text)
    return f"{show(text[:limit])}...(+{len(text) - limit} chars)"


def quoted(value: str, limit: int = 64) -> str:
    """A string from outside (a client's model name) as a message quotes it, ``repr``, cut
    past ``limit`` characters: what follows it in the message (what to do) must not drown."""
    return clipped(value, limit, repr)
