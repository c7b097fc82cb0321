"""`layerwise compress | ppl | decompress | inspect | export | bench | generate | families`.

Exit status: 0 done; 2 a user mistake or an environment failure (bad input, full disk, read-only
output, too little memory) — one line naming the problem and the fix, never a traceback; 1 a bug in
layerwise — the traceback and a request to report it; 130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import sys
import traceback

from . import methods
from .bench.command import add_bench, cmd_bench
from .errors import LayerwiseError, PeerError, RecipeError
from .exporters import DEFAULT_FORMAT, EXPORTERS
from .float_targets import TARGETS
from .outputs import environment_failure

log = logging.getLogger("layerwise")

OVERWRITE_HELP = "replace --out if layerwise wrote it (never a foreign directory or an input), once the new one is complete"
BUG_REPORT = "this is a bug in layerwise, not in your input: please report it with the command line and the traceback above"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def at_least(minimum: int):
    """argparse type: an integer >= minimum (sizes and counts: 1; a seed or a step count: 0)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


positive, non_negative = at_least(1), at_least(0)


def _loading_flags(p: argparse.ArgumentParser, checkpoint: bool = True, long_context: bool = True) -> None:
    """Flags shared by every command that opens a model or a checkpoint."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the model (auto_map); off by default, never asked on stdin")
    if checkpoint:
        p.add_argument("--no-verify", dest="verify", action="store_false",
                       help="skip the sha256 check of a checkpoint's shards (faster loading)")
    if long_context:
        p.add_argument("--allow-long-context", action="store_true",
                       help="allow windows/contexts beyond the model's max positions (e.g. rope-scaled use)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="layerwise", description=__doc__.splitlines()[0])
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_compress(sub)
    _add_ppl_decompress_inspect(sub)
    _add_export(sub)
    add_bench(sub, positive, non_negative)
    _add_generate_and_families(sub)
    return p


def _add_compress(sub) -> None:
    from layerwise.calib_data import BUNDLED_CALIBRATION

    c = sub.add_parser("compress", help="compress a model into a checkpoint directory")
    c.add_argument("model", help="HF model directory or Hub id")
    c.add_argument("--out", required=True, help="checkpoint directory to create")
    c.add_argument("--method", choices=methods.names(), help="method for every block linear (or use --recipe)")
    _method_flags(c)
    c.add_argument("--recipe", help="YAML/JSON recipe (ours or coremltools' dialect) or a checkpoint; overrides --method")
    c.add_argument("--embeddings", type=int, choices=(8, 4),
                   help="also quantize the token embedding (and the output head tied to it): round to nearest, "
                        "that many bits per block of 32 (8: symmetric, 4: asymmetric); a rule in front of the recipe")
    target = c.add_mutually_exclusive_group()
    target.add_argument("--target-bits", type=float,
                        help="size budget: bits per weight over the compressed layers; bits per layer chosen by sensitivity")
    target.add_argument("--target-mb", type=float,
                        help="size budget: MB of the export in --target-format; bits per layer chosen by sensitivity")
    c.add_argument("--target-format", choices=sorted(EXPORTERS),
                   help=f"the output --target-mb prices (default: {DEFAULT_FORMAT})")
    c.add_argument("--calib", default=BUNDLED_CALIBRATION, help="wikitext2 | c4 | PATH (default: bundled excerpt)")
    c.add_argument("--nsamples", type=positive, default=128)
    c.add_argument("--seqlen", type=positive, default=256)
    c.add_argument("--seed", type=non_negative, default=0)
    c.add_argument("--device", default="auto", help="cpu | cuda | mps | auto")
    c.add_argument("--batch-size", type=positive, default=8, help="calibration windows per forward")
    c.add_argument("--no-staged", dest="staged", action="store_false", help="collect all Hessians of a block in one pass")
    c.add_argument("--targets", choices=TARGETS, default="compressed",
                   help="what each layer's outputs are fitted to: its own weights' on the compressed model's inputs "
                        "(default), or the float model's outputs (GPTAQ-style; one more block forward, the float "
                        "model's activations beside the compressed ones): 'float' for every group but the MLP's "
                        "down_proj (a block's widest input, the costliest to fit), 'float-all' for every group")
    c.add_argument("--float-alpha", type=float,
                   help="with --targets float: the fraction of the step from each weight towards its float fit taken "
                        "(default 0.4; GPTAQ uses 0.25; 1: the exact least-squares fit)")
    c.add_argument("--magr", action="store_true",
                   help="MagR: before each GPTQ / SparseGPT-with-bits layer is solved, shrink its weight range without "
                        "changing its outputs on the calibration data (helps low-bit per-channel grids; ~200 "
                        "[out, in] x [in, in] products per layer)")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    c.add_argument("--allow-non-finite", action="store_true",
                   help="accept NaN/Inf weights in the layers the recipe leaves alone")
    _loading_flags(c, checkpoint=False)
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (same arguments) after its last complete block")
    c.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations memory-mapped on disk next to --out (long windows, many samples)")
    c.add_argument("--dist-timeout", type=float, default=300.0,
                   help="under torchrun / accelerate launch: seconds a rank waits for the others before stopping")
    c.add_argument("--exact-matmul", action="store_true",
                   help="plain float32 matrix products (default: products through bfloat16 units where the device keeps "
                        "float32 accuracy, about twice as fast on CPUs with AVX512-BF16)")
    c.add_argument("--eager-load", action="store_true",
                   help="load the whole model with from_pretrained instead of reading each block from disk when reached")


def _add_ppl_decompress_inspect(sub) -> None:
    q = sub.add_parser("ppl", help="perplexity of a model or checkpoint")
    q.add_argument("model")
    q.add_argument("--data", default="wikitext2", help="wikitext2 | c4 | PATH")
    q.add_argument("--seqlen", type=positive, default=256)
    q.add_argument("--batch-size", type=positive, default=8)
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    q.add_argument("--json", action="store_true", help="end with one JSON line")
    q.add_argument("--exact-matmul", action="store_true",
                   help="plain float32 matrix products (default: through bfloat16 units where the device keeps float32 "
                        "accuracy; the same perplexity to ~1e-6, several times faster on large vocabularies)")
    _loading_flags(q)

    d = sub.add_parser("decompress", help="write a plain float16 HF checkpoint with the dequantized values")
    d.add_argument("checkpoint")
    d.add_argument("--out", required=True)
    d.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _loading_flags(d, long_context=False)

    i = sub.add_parser("inspect", help="per-layer report of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.add_argument("--no-verify", dest="verify", action="store_false", help="skip the shards' sha256 check")


def _add_export(sub) -> None:
    e = sub.add_parser("export", help="stateful iOS18 Core ML mlpackage (default), MLX directory or GGUF file")
    e.add_argument("model", help="layerwise checkpoint or HF model directory / Hub id")
    e.add_argument("--out", required=True, help="Model.mlpackage, MLX directory or FILE.gguf to create")
    e.add_argument("--format", default=DEFAULT_FORMAT, choices=sorted(EXPORTERS), help="output format (default: coreml)")
    e.add_argument("--context", type=positive, default=512, help="maximum tokens (KV-cache length)")
    e.add_argument("--multifunction", action="store_true", help="prefill + decode functions sharing the weights")
    e.add_argument("--prefill-length", type=positive, default=64, help="query length of the prefill function")
    e.add_argument("--last-logits-only", action="store_true", help="return logits of the last position only")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _loading_flags(e)


def _add_generate_and_families(sub) -> None:
    g = sub.add_parser("generate", help="stream text through the export wrapper (or an mlpackage on macOS)")
    g.add_argument("model", help="HF model directory / Hub id, layerwise checkpoint, or Model.mlpackage")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    g.add_argument("--cache-dtype", choices=("float32", "float16"), default="float32",
                   help="KV-cache dtype of the wrapper (the exported package holds float16)")
    f = sub.add_parser("families", help="the supported architectures and what each supports")
    f.add_argument("--json", action="store_true")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    follower = int(os.environ.get("RANK", "0")) != 0  # torch.distributed: rank 0 alone logs and reports
    logging.basicConfig(level=logging.WARNING if args.quiet or follower else logging.INFO, format="%(message)s")
    _quiet_third_party()
    name = f"layerwise {args.command}"
    try:
        with _sigterm_as_interrupt(), _no_stdin():
            return COMMANDS[args.command](args) or 0
    except LayerwiseError as e:
        if not follower or isinstance(e, PeerError):
            print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and e.args[0] == signal.SIGTERM else signal.SIGINT
        left = getattr(e, "left", None) or "incomplete outputs were removed"
        print(f"{name}: stopped by {signal.Signals(signum).name}; {left}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # `layerwise inspect CK | head`: the reader left, nothing more to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as e:
        failure = environment_failure(e, getattr(args, "out", None) or "the output", writing=False) or _allocation_failure(e)
        if failure is not None:
            print(f"{name}: error: {failure}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"{name}: internal error: {BUG_REPORT}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops like Ctrl-C: the same KeyboardInterrupt unwinds and removes partial outputs."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signum)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _no_stdin():
    """No library may ask the user anything (transformers prompts for remote code on stdin)."""
    saved, sys.stdin = sys.stdin, io.StringIO()
    try:
        yield
    finally:
        sys.stdin = saved


def _allocation_failure(e: Exception) -> str | None:
    """One line for memory that cannot be had (a context or batch far too large), else None."""
    text = str(e)
    if isinstance(e, MemoryError) or any(s in text for s in ("can't allocate memory", "out of memory", "Overflow when",
                                                             "integer multiplication overflow")):
        return ("not enough memory for this request (" + (_one_line(e) or type(e).__name__)[:160] + "); lower "
                "--context, --seqlen, --batch-size or --nsamples")
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _quiet_third_party() -> None:
    """Our own progress bars and log lines are enough; transformers' per-load bars are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # "… thrown while requesting HEAD" retries
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer's plan names our temporary file


def _method_flags(p: argparse.ArgumentParser) -> None:
    """The registered methods' flags (`methods.flags`): one option each, or a mutually exclusive pair."""
    for flag in methods.flags():
        group = p.add_mutually_exclusive_group() if len(flag.options) > 1 else p
        for option in flag.options:
            typed = {} if option.minimum is None else {"type": at_least(option.minimum)}
            group.add_argument(*option.names, **typed, **option.settings)


def method_config_from_flags(args) -> dict:
    """The --method flags as one recipe config dict (only flags the user gave)."""
    if args.method is None:
        raise RecipeError(f"give --method ({', '.join(methods.names())}) or --recipe FILE")
    return methods.config_from_flags(args.method, {flag.dest: getattr(args, flag.dest) for flag in methods.flags()})


def cmd_compress(args) -> int:
    from . import distributed
    from .budget.run import compress_to_budget
    from .inspect import summary
    from .pipeline import compress_to_checkpoint

    if args.target_bits is not None or args.target_mb is not None:
        job = _compress_job(args)
        path, _, allocation = compress_to_budget(job.validate())
        print(summary(path))
        print(f"budget {job.target.describe()}: {allocation.bits_per_weight:.4f} bits/weight, "
              f"{allocation.export_mb:.2f} MB exported (predicted); rerun with --recipe {path}")
        return 0
    recipe = _compress_recipe(args)  # a bad recipe is named before joining the other ranks
    ranks, device = distributed.from_environment(args.device, args.dist_timeout)
    try:
        path, _ = compress_to_checkpoint(_compress_job(args, recipe, ranks, device).validate())
    finally:
        distributed.leave(ranks)
    if ranks.main:
        print(summary(path))
    return 0


def _compress_recipe(args):
    """The recipe the flags ask for: --recipe, else the --method flags; with a size budget, the menu
    each layer chooses from (the --method's, else DEFAULT_BUDGET_METHOD's)."""
    from .budget import menu_recipe
    from .job import DEFAULT_BUDGET_METHOD
    from .recipe import Recipe, load_recipe, method_config

    if args.recipe:
        recipe = load_recipe(args.recipe)
    elif args.target_bits is None and args.target_mb is None:
        recipe = Recipe.single(method_config(method_config_from_flags(args), "command line"))
    else:
        recipe = menu_recipe(method_config_from_flags(argparse.Namespace(
            **{**vars(args), "method": args.method or DEFAULT_BUDGET_METHOD})))
    return _with_embeddings(recipe, args.embeddings, args.grid)


# `--embeddings BITS`: round to nearest per block of 32 token-row values (one outlier no longer sets
# the step of a whole row: per row, 8 bits cost Gemma 3 270M +0.26 ppl where blocks of 32 cost +0.00,
# benchmarks/RESULTS.md). 8 bits symmetric is GGUF's Q8_0 layout and 4 bits asymmetric its Q4_1, and
# both are MLX groups of 32, so the table travels exactly to every output. At 8 bits the clipping
# search gains nothing and takes minutes over a 168 M-value table.
EMBEDDING_PRESETS = {8: {"method": "rtn", "bits": 8, "block_size": 32, "sym": True, "mse_clip": False},
                     4: {"method": "rtn", "bits": 4, "block_size": 32}}


def _with_embeddings(recipe, bits: int | None, grid: str | None = None):
    """`recipe` with `--embeddings BITS` (EMBEDDING_PRESETS, on `--grid`'s lattice when given) in front;
    under a size budget its bytes count against the target like any layer's."""
    from .recipe import method_config

    if bits is None:
        return recipe
    config = {**EMBEDDING_PRESETS[bits], **({"grid": grid} if grid else {})}
    return recipe.with_embeddings(method_config(config, "--embeddings"))


def _compress_job(args, recipe=None, ranks=None, device: str | None = None):
    """The `compress` flags as one CompressJob (validated by its `validate()`, before any block)."""
    from .budget import Target
    from .distributed import SINGLE
    from .job import CompressJob

    if args.target_format and args.target_mb is None:
        raise RecipeError(f"--target-format {args.target_format} says which output --target-mb prices; add --target-mb, "
                          "or leave --target-format out")
    budget = args.target_bits is not None or args.target_mb is not None
    target = Target(bits=args.target_bits, mb=args.target_mb, format=args.target_format or DEFAULT_FORMAT) if budget else None
    return CompressJob(
        model=args.model, out=args.out, recipe=recipe if recipe is not None else _compress_recipe(args),
        calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, target=target,
        device=device or args.device, batch_size=args.batch_size, staged=args.staged, overwrite=args.overwrite,
        resume=args.resume, offload_activations=args.offload_activations, lazy=False if args.eager_load else None,
        trust_remote_code=args.trust_remote_code, allow_non_finite=args.allow_non_finite,
        allow_long_context=args.allow_long_context, fast_matmul=not args.exact_matmul, ranks=ranks or SINGLE,
        inputs=(args.recipe,), targets=args.targets, float_alpha=args.float_alpha, magr=args.magr,
    )


def cmd_ppl(args) -> int:
    from .pipeline import evaluate_perplexity

    res = evaluate_perplexity(args.model, args.data, args.seqlen, args.batch_size, args.device, args.dtype,
                              trust_remote_code=args.trust_remote_code, verify=args.verify,
                              allow_long_context=args.allow_long_context, fast_matmul=not args.exact_matmul)
    print(f"perplexity {res['ppl']:.4f} over {res['tokens']} tokens in {res['windows']} windows of {res['seqlen']}")
    if args.json:
        print(json.dumps(res))
    return 0


def cmd_decompress(args) -> int:
    from .checkpoint import decompress

    path = decompress(args.checkpoint, args.out, overwrite=args.overwrite, verify=args.verify,
                      trust_remote_code=args.trust_remote_code)
    print(f"wrote {path}")
    return 0


def cmd_inspect(args) -> int:
    from .checkpoint import read_manifest
    from .inspect import check_files, report_json, report_table

    check_files(args.checkpoint, read_manifest(args.checkpoint), args.verify)
    print(json.dumps(report_json(args.checkpoint), indent=2) if args.json else report_table(args.checkpoint))
    return 0


def cmd_export(args) -> int:
    from .export import export_model

    report = export_model(args.model, args.out, context=args.context, multifunction=args.multifunction,
                          prefill_length=args.prefill_length, last_logits_only=args.last_logits_only,
                          overwrite=args.overwrite, trust_remote_code=args.trust_remote_code, verify=args.verify,
                          allow_long_context=args.allow_long_context, format=args.format)
    done = f"wrote {report['path']}: {report['size_bytes'] / 1e6:.2f} MB in {report['seconds']:.1f} s"
    if "summary" in report:  # MLX, GGUF: which layers went into which type, and how exactly
        print(f"{done}\n{report['summary']}")
    else:
        print(f"{done}; functions {', '.join(report['functions'])}; compressed ops {report['compressed']}")
    return 0


def cmd_generate(args) -> int:
    from .generate import generate, stats_line

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    write(args.prompt)
    _, stats = generate(args.model, args.prompt, args.max_new_tokens, args.temperature, args.seed,
                        args.cache_dtype, write=write)
    sys.stdout.write("\n")
    print(stats_line(stats), file=sys.stderr)
    return 0


def cmd_families(args) -> int:
    from .models.families import FAMILIES

    rows = [{"family": f.name, "model_types": list(f.model_types), "covers": list(f.aliases),
             "supports": list(f.supports()), "traits": f.traits()} for f in FAMILIES]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'family':<12} {'compress':<9} {'export':<7} {'generate':<9} {'covers':<34} traits")
    for r in rows:
        marks = ["✓" if s in r["supports"] else "-" for s in ("compress", "export", "generate")]
        print(f"{r['family']:<12} {marks[0]:<9} {marks[1]:<7} {marks[2]:<9} {', '.join(r['covers']):<34} "
              f"{' '.join(r['traits'])}")
    print("other decoders with their blocks in one nn.ModuleList: compress only (generic fallback)")
    return 0


COMMANDS = {"bench": cmd_bench, "export": cmd_export, "compress": cmd_compress, "ppl": cmd_ppl, "decompress": cmd_decompress, "inspect": cmd_inspect}

COMMANDS.update(generate=cmd_generate, families=cmd_families)

if __name__ == "__main__":
    sys.exit(main())
