"""Errors a user can act on. The CLI prints these as one line, never as a traceback."""


class ClipforgeError(Exception):
    """Base class: the message names the file, field or key at fault and says what to do."""


class ConfigError(ClipforgeError):
    """A model or experiment configuration is missing, unknown or invalid."""


class CheckpointError(ClipforgeError):
    """A checkpoint file cannot be read, has the wrong layout, or does not fit the model."""


class TrainingError(ClipforgeError):
    """Training cannot go on (the loss became non-finite); nothing already saved is touched."""


class InputError(ClipforgeError):
    """An image, caption or data file is unreadable, empty or corrupt."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name when it has none), to embed in our own errors."""
    return " ".join(str(error).split()) or type(error).__name__
