"""`layerwise bench`: its flags and the command (the CLI dispatches to `cmd_bench`)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from layerwise.errors import DataError, RecipeError

log = logging.getLogger("layerwise")


def add_bench(sub, positive, non_negative) -> None:
    """The `bench` subcommand's flags (positive, non_negative: the CLI's argparse integer types)."""
    from layerwise.calib_data import BUNDLED_CALIBRATION

    b = sub.add_parser("bench", help="a grid of recipes: ppl, size, time, memory; writes RESULTS.md, CSV, JSON, PNG")
    b.add_argument("model")
    b.add_argument("--grid", default="spine", help="spine | spine-extra | sparse | palettize | peers | smollm2 (or its halves smollm2-gptq, smollm2-sparse-palettize) | gemma3 | quick")
    b.add_argument("--quick", action="store_true", help="the small smoke-test grid (same as --grid quick)")
    b.add_argument("--calib", default=BUNDLED_CALIBRATION)
    b.add_argument("--eval", dest="eval_text", default="wikitext2", help="evaluation text: wikitext2 | c4 | PATH")
    b.add_argument("--nsamples", type=positive, default=128)
    b.add_argument("--seqlen", type=positive, default=256)
    b.add_argument("--seed", type=non_negative, default=0)
    b.add_argument("--device", default="cpu")
    b.add_argument("--repeat", type=positive, default=1, help="runs per row; times reported as medians")
    b.add_argument("--eval-tokens", type=positive, help="evaluate on the first N tokens of the evaluation text only (slow machines)")
    b.add_argument("--threads", type=positive, help="torch threads of every row's process (1: CPU seconds that other "
                   "work on a shared machine disturbs least; the table then shows them next to wall seconds)")
    b.add_argument("--results", default="RESULTS.md", help="Markdown file whose grid section is replaced (default: ./RESULTS.md)")
    b.add_argument("--out-dir", help="where CSV/JSON/PNG go (default: next to --results)")
    b.add_argument("--resume", action="store_true",
                   help="keep the rows the grid's JSON in --out-dir already holds for the same recipe and arguments; "
                        "run only the others (a long grid across several sittings)")


def cmd_bench(args) -> int:
    """Run the grid's rows (those an earlier run measured, with --resume, are kept) and publish each."""
    from .grids import GRIDS
    from .plots import require_matplotlib
    from .results import display_path, render_section, update_results, write_outputs
    from .rows import run_grid

    grid = "quick" if args.quick else args.grid
    if grid not in GRIDS:
        raise RecipeError(f"--grid {grid!r} is unknown; use one of {sorted(GRIDS)}")
    if args.eval_tokens is not None and args.eval_tokens < args.seqlen:
        raise RecipeError(f"--eval-tokens {args.eval_tokens} is less than one window of --seqlen {args.seqlen}")
    require_matplotlib()  # before the first row, not after an hour of them
    results = Path(args.results)
    out_dir = Path(args.out_dir) if args.out_dir else results.parent
    words = [display_path(word) for word in sys.argv]  # the shell expanded ~: no machine paths in RESULTS.md
    command = "layerwise " + " ".join(words[1:]) if sys.argv[0].endswith("layerwise") else " ".join(["python", *words])
    total = len(GRIDS[grid])

    def publish(rows, done):
        paths = write_outputs(rows, out_dir, f"bench-{grid}")
        evaluated = args.eval_text + (f" (first {args.eval_tokens} tokens)" if args.eval_tokens else "")
        section = render_section(grid, rows, command, args.model, args.calib, evaluated, args.nsamples,
                                 args.seqlen, args.seed, paths["png"])
        if not done:
            section += f"\n\n(partial: {len(rows)} of {total} rows so far)"
        update_results(results, grid, section)
        return section

    measured = _measured_rows(out_dir / f"bench-{grid}.json") if args.resume else None
    rows = run_grid(GRIDS[grid], args.model, args.calib, args.eval_text, args.nsamples, args.seqlen, args.seed,
                    args.device, progress=lambda m: log.info("%s", m), on_row=publish, repeat=args.repeat,
                    eval_tokens=args.eval_tokens, threads=args.threads, measured=measured)
    print(publish(rows, True))
    return 1 if any(r.get("error") for r in rows) else 0


def _measured_rows(path) -> list[dict]:
    """The rows an earlier `bench` run of this grid wrote (none yet: an empty list)."""
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"--resume cannot read {path} ({e}); move it away or run without --resume") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"--resume: {path} is not a bench results list; move it away or run without --resume")
    return rows
