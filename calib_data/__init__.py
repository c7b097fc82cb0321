"""Calibration and evaluation text (installed as `layerwise.calib_data`).

Sources: Hub datasets by name (`wikitext2`, `c4`) through `datasets.load_dataset`, a local `.txt`,
a `.jsonl` with a `text` field, or a directory of those; plus the bundled WikiText-2 excerpts.
"""

from .sources import (
    BUNDLED_CALIBRATION,
    BUNDLED_EVALUATION,
    HUB_TEXTS,
    HubText,
    bos_token_id,
    calibration_windows,
    load_text,
    sample_windows,
    tokenize_text,
    with_bos,
)

__all__ = [
    "BUNDLED_CALIBRATION", "BUNDLED_EVALUATION", "HUB_TEXTS", "HubText",
    "bos_token_id", "calibration_windows", "load_text", "sample_windows", "tokenize_text", "with_bos",
]
