"""Exceptions a user can act on. The CLI prints their message on one line and exits with code 2."""


class LayerwiseError(Exception):
    """Base class: a problem with the user's input, named together with its fix."""


class RecipeError(LayerwiseError, ValueError):
    """A recipe key or value that cannot be used."""


class DataError(LayerwiseError, ValueError):
    """Calibration or evaluation text that cannot serve the request."""


class ModelError(LayerwiseError, ValueError):
    """A model that cannot be loaded or walked."""


class NumericalError(LayerwiseError, ArithmeticError):
    """NaN/Inf or a Hessian that cannot be factored even with more damping."""


class OutputError(LayerwiseError, OSError):
    """An output path that must not be written (an input, a foreign directory) or cannot be (full, read-only)."""


class CheckpointError(ModelError):
    """A layerwise checkpoint whose manifest or tensors are damaged or do not agree."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (args[0]: the signal number, if known), with what is left on disk."""

    def __init__(self, *args, left: str | None = None):
        super().__init__(*args)
        self.left = left


class PeerError(LayerwiseError, RuntimeError):
    """Another torch.distributed rank died or stopped answering (a collective failed or timed out)."""


class OutputBusy(OutputError):
    """Another live run owns the output being written (its owner file in the unfinished output)."""


class InputsChanged(ModelError):
    """--resume over an unfinished run whose source weights, calibration or tokenizer have changed since."""
