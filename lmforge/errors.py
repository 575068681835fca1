"""The one exception family lmforge raises for problems a user can fix.

Every error names the file, field or value at fault and what was expected. The CLI prints the
message on one line (no traceback unless `--debug`). Programming errors (bugs) stay ordinary
Python exceptions so they are not mistaken for bad input.
"""


class LMForgeError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class ConfigError(LMForgeError):
    """A config file, preset or override is wrong (unknown key, bad type, conflicting values)."""


class DataError(LMForgeError):
    """A corpus, shard or document cannot be read or is not what was expected."""


class TokenizerError(LMForgeError):
    """A tokenizer file is corrupt or a tokenizer request is invalid."""


class CheckpointError(LMForgeError):
    """A checkpoint or run directory is missing, incomplete or incompatible."""


class MissingDependencyError(LMForgeError):
    """An optional package is needed for this feature and is not installed."""

    def __init__(self, package: str, feature: str, extra: str | None = None):
        hint = f"pip install 'lmforge[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the package '{package}', which is not installed ({hint})")
        self.package = package


def require(module: str, feature: str, extra: str | None = None, package: str | None = None):
    """Import an optional module or raise MissingDependencyError naming the feature that needs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package or module, feature, extra) from e
