"""Errors a user can cause (bad files, bad input). The CLI prints them as one line and exits 2."""


class LocalMoeError(Exception):
    """Base for every error that is the input's fault, not a bug."""


class ModelFileError(LocalMoeError):
    """A model file is missing, truncated, corrupt, or of an unsupported kind."""


class ConvertError(LocalMoeError):
    """A conversion source is not a checkpoint we can convert."""


class InputError(LocalMoeError):
    """A prompt, option or argument is invalid (too long for the context, unknown value...)."""
