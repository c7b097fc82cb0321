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


class PeerError(LayerwiseError, RuntimeError):
    """Another torch.distributed rank died or stopped answering (a collective failed or timed out)."""
