"""Where text comes from, and how it becomes seeded windows of token ids."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerwise.errors import DataError

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
BUNDLED_CALIBRATION = str(_HERE / "wikitext2-valid-excerpt.txt")
BUNDLED_EVALUATION = str(_HERE / "wikitext2-test-excerpt.txt")


@dataclass(frozen=True)
class HubText:
    """A text dataset read with `datasets.load_dataset(path, name, data_files=…, split=…)`."""

    path: str
    name: str | None = None
    calibration_split: str = "train"
    evaluation_split: str = "test"
    text_field: str = "text"
    data_files: dict = field(default_factory=dict)
    joiner: str = "\n\n"
    max_rows: int | None = None  # cap rows read (C4 shards are large)


HUB_TEXTS: dict[str, HubText] = {
    "wikitext2": HubText("wikitext", "wikitext-2-raw-v1", "train", "test"),
    "c4": HubText(
        "allenai/c4",
        None,
        "train",
        "validation",
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        joiner=" ",
        max_rows=20000,
    ),
}


def load_text(source: str, purpose: str = "calibration") -> str:
    """All text of `source` (a HUB_TEXTS name, a file, or a directory) for `purpose`.

    purpose: "calibration" (the train split of a Hub dataset) or "evaluation" (its test split).
    """
    if source in HUB_TEXTS:
        return load_hub_text(HUB_TEXTS[source], purpose)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise DataError(f"directory {source} holds no .txt or .jsonl files")
        return "\n\n".join(_read_file(p) for p in files)
    if path.is_file():
        return _read_file(path)
    raise DataError(
        f"text source {source!r} is neither a file, a directory, nor a known dataset "
        f"({', '.join(HUB_TEXTS)}); give a path to a .txt/.jsonl file or directory"
    )


def load_hub_text(spec: HubText, purpose: str) -> str:
    import datasets  # heavy import, only when a Hub dataset is asked for

    split = spec.calibration_split if purpose == "calibration" else spec.evaluation_split
    kwargs = {}
    if spec.data_files:
        kwargs["data_files"] = {split: spec.data_files[split]} if split in spec.data_files else spec.data_files
    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=split, **kwargs)
    except Exception as e:  # network, missing dataset, bad split: all user-facing
        raise DataError(
            f"could not load dataset {spec.path!r} ({spec.name or 'default'}, split {split!r}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} — check the name and your "
            "network, or pass a local .txt/.jsonl file instead"
        ) from None
    if spec.text_field not in ds.column_names:
        raise DataError(f"dataset {spec.path!r} has no {spec.text_field!r} column (columns: {ds.column_names})")
    rows = ds[spec.text_field] if spec.max_rows is None else ds.select(range(min(spec.max_rows, len(ds))))[spec.text_field]
    return spec.joiner.join(rows)


def _read_file(path: Path) -> str:
    try:
        return _read_text_file(path)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); convert it, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _read_text_file(path: Path) -> str:
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DataError(f"{path}:{lineno} has no string field 'text' (each line must be {{\"text\": ...}})")
                texts.append(row["text"])
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, no special tokens: [n_tokens] int64."""
    if not text.strip():
        raise DataError("the text is empty")
    # the stream is cut into windows afterwards: the tokenizer's max length does not apply
    with _quiet_transformers():
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_token_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one before every text by default (Gemma, Llama 3), else
    None (SmolLM2, Qwen). Windows then begin like the model's own text: a model trained with BOS
    parks attention on it, so calibrating or scoring it without one measures a model nobody runs."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with _quiet_transformers():
        ids = tokenizer("a", add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """[N, L-1] text windows with `bos` put first → [N, L] (unchanged when bos is None)."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """`nsamples` distinct non-overlapping windows of `seqlen` tokens, chosen with `seed`; with
    `bos`, each is BOS followed by seqlen - 1 tokens of text.

    Returns [nsamples, seqlen] int64. Never repeats text: too few windows is an error.
    """
    if nsamples < 1 or seqlen < 2 + (bos is not None):
        raise DataError(f"need nsamples >= 1 and seqlen >= 2 (got nsamples={nsamples}, seqlen={seqlen})")
    text_len = seqlen - (bos is not None)
    available = token_ids.numel() // text_len
    if available < nsamples:
        raise DataError(
            f"the calibration text has {token_ids.numel()} tokens = {available} windows of {seqlen}, "
            f"but {nsamples} were requested; give more text or lower --nsamples / --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:nsamples]
    windows = token_ids[: available * text_len].reshape(available, text_len)
    return with_bos(windows[chosen].clone(), bos)


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Tokenized calibration windows and a JSON-able description of where they came from."""
    token_ids = tokenize_text(tokenizer, load_text(source, "calibration"))
    bos = bos_token_id(tokenizer)
    windows = sample_windows(token_ids, nsamples, seqlen, seed, bos)
    description = {
        "source": source if source in HUB_TEXTS else os.path.abspath(source),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "text_tokens": int(token_ids.numel()),
        "bos_token_id": bos,  # each window starts with it (None: windows are text only)
    }
    return windows, description


class _quiet_transformers:
    """Silence transformers' 'sequence longer than max length' warning while tokenizing a stream."""

    def __enter__(self):
        self.logger = logging.getLogger("transformers.tokenization_utils_base")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
