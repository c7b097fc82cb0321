"""coremltools' weight-file writer without its copies of the float16 consts, and with parked codes
dropped from memory again once written.

coremltools 9.0 writes each const through `backend.mil.helper._get_offset_by_writing_data`, which
hands a float16 const to the blob writer as ``np.frombuffer(val.flatten().tobytes(), np.uint16)``:
two whole copies of it (2 × 188 MiB for a 32000 × 3072 embedding, the save's peak). `lean_writer`
wraps that one function for the length of a save:

- a C-contiguous float16 const goes to the same `write_fp16_data` call as a uint16 view of its own
  bytes (the bytes written are the same; nothing is copied); every other const takes the stock path;
- after each const, the pages of the `Spill` (`layerwise.spill`) its value was read from are
  dropped, so the codes of one layer at a time are resident while the file is written.

The wrapper is checked against coremltools 9.0's code (`WRAPPED_VERSIONS`); on another version
coremltools' function is left alone (same file, written with its copies) and a debug line says so.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np

log = logging.getLogger(__name__)

WRAPPED_VERSIONS = ("9.0",)  # coremltools versions whose _get_offset_by_writing_data this wraps


@contextlib.contextmanager
def lean_writer(spill=None):
    """Inside: coremltools' const writer as described above. Yields whether the wrapper applies."""
    import coremltools as ct
    from coremltools.converters.mil.backend.mil import helper
    from coremltools.converters.mil.mil import types

    stock = getattr(helper, "_get_offset_by_writing_data", None)
    if ct.__version__ not in WRAPPED_VERSIONS or stock is None:
        log.debug("coremltools %s: its weight writer is used as is (copies each float16 const twice)", ct.__version__)
        yield False
        return

    def write(output_var, blob_writer):
        val = output_var.val
        if output_var.dtype == types.fp16 and isinstance(val, np.ndarray) and val.dtype == np.float16 \
                and val.flags.c_contiguous:
            offset = blob_writer.write_fp16_data(val.reshape(-1).view(np.uint16))
        else:
            offset = stock(output_var, blob_writer)
        if spill is not None and isinstance(val, np.ndarray):
            spill.release(val)
        return offset

    helper._get_offset_by_writing_data = write
    try:
        yield True
    finally:
        helper._get_offset_by_writing_data = stock
