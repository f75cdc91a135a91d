"""jaxnet's error types: what a caller can get wrong (data, config, checkpoint, devices) and a run that
diverged. Each message is one line naming what was expected and what was found. Entry points turn exactly
these into one line and an exit code; any other exception is a bug and keeps its traceback."""


class JaxnetError(Exception):
    """Base of every error jaxnet raises on purpose."""


class DataError(JaxnetError, ValueError):
    """A data source or batch that cannot be read as what was asked for."""


class ConfigError(JaxnetError, ValueError):
    """A config value, argument or option that cannot work (unknown name, wrong type, out of range)."""


class CheckpointError(JaxnetError, ValueError):
    """A checkpoint that cannot be restored into this run; the message names its directory."""


class ParallelError(JaxnetError, ValueError):
    """A device, process or batch layout that cannot work."""


class TrainingDiverged(JaxnetError, RuntimeError):
    """The training loss became NaN or infinite."""
