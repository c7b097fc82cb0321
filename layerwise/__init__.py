"""layerwise: calibrated, block-by-block compression of Hugging Face LLMs for Core ML."""

__version__ = "0.1.0"

from .api import compress  # noqa: E402
from .checkpoint import LoadedCheckpoint, decompress, load_compressed  # noqa: E402
from .engine import LayerwiseCompressor  # noqa: E402
from .errors import LayerwiseError  # noqa: E402
from .formats import CompressedWeight  # noqa: E402
from .job import CompressJob  # noqa: E402
from .recipe import Recipe, load_recipe, recipe_from_dict  # noqa: E402

__all__ = [
    "__version__", "CompressJob", "CompressedWeight", "LayerwiseCompressor", "LayerwiseError", "LoadedCheckpoint", "Recipe",
    "compress", "decompress", "load_compressed", "load_recipe", "recipe_from_dict",
]
