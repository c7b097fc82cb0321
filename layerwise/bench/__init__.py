"""`layerwise bench`: a grid of recipes on one model, one calibration set, one evaluation text.

Modules, each importing only those before it: `measure` (forward time, peak memory, evaluation
tokens), `peers` (the same compressions by coremltools), `grids` (the rows of each grid), `rows`
(one row per fresh process), `plots` (matplotlib, optional), `results` (Markdown, CSV, JSON) and
`command` (the CLI subcommand: its flags, `--resume`).
Rows are written as Markdown, CSV and JSON, plus a PNG of perplexity vs bits.
"""
