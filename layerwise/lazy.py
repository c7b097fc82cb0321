"""Models larger than memory: a meta-device skeleton whose blocks are read from safetensors on demand.

`open_lazy(name_or_path)` builds the model without weights (meta device), loads every tensor outside
the decoder blocks (embeddings, final norm, lm_head) and returns it with a `LazyBlocks` that the
engine calls to read one block's weights when it reaches the block (`safe_open`, memory-mapped) and
to drop them once the block is written. Non-persistent buffers (rotary `inv_freq`) are computed by
the skeleton's constructor, never loaded; tied embeddings stay one tensor.

A Hub id is downloaded (safetensors, config and tokenizer files only) through `huggingface_hub`
into its cache, then read the same way. A pickle-only checkpoint is refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .errors import ModelError
from .model_checks import check_causal, check_finite

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]  # no pickles, no other formats


def resolve_local(name_or_path: str) -> Path:
    """A local directory holding the model: the path itself, or the Hub snapshot downloaded into the cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated, …: all user-fixable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot download {name_or_path!r} from the Hub: {first} — give a local model directory") from None


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it (sharded or single-file checkpoints); every
    shard the index names must exist."""
    index = directory / INDEX
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
            files = {name: directory / file for name, file in mapping.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index} is not a readable index (JSON with a weight_map of tensor → shard); "
                             "download or save the model again") from None
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ModelError(f"{INDEX} in {directory} names the shard {shard.name}, which is missing; download "
                                 "that shard again (or save the model again)")
        return files
    single = directory / SINGLE
    if single.is_file():
        with _reading(single) as f:
            return {name: single for name in f.keys()}
    if any((directory / p).is_file() for p in PICKLES):
        raise ModelError(
            f"{directory} holds only pickled weights (pytorch_model.bin), which layerwise never unpickles; convert "
            "them once with `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` "
            "in a trusted environment (layerwise reads safetensors only)"
        )
    raise ModelError(f"{directory} has no model.safetensors or {INDEX}; point at a Hugging Face model directory")


class LazyBlocks:
    """Reads block `i`'s tensors from the checkpoint into the skeleton, and puts them back on meta."""

    def __init__(self, model: nn.Module, blocks_path: str, files: dict[str, Path], dtype: torch.dtype):
        # tensors checked for NaN/Inf as they are read: None = all, else only these names (the layers a
        # recipe compresses, with --allow-non-finite)
        self.finite_names: set[str] | None = None
        self.model = model
        self.blocks_path = blocks_path
        self.files = files
        self.dtype = dtype

    def load(self, index: int, block: nn.Module) -> None:
        """Fill `block`'s parameters and persistent buffers from the files (in the skeleton's dtype)."""
        prefix = f"{self.blocks_path}.{index}."
        names = list(block.state_dict().keys())
        missing = [n for n in names if prefix + n not in self.files]
        if missing:
            raise ModelError(
                f"the checkpoint has no tensor {prefix + missing[0]!r} (its names differ from the model's); "
                "pass --eager-load to load it through transformers"
            )
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[prefix + name], []).append(name)
        state = {}
        for file, group in by_file.items():
            with _reading(file) as f:
                for name in group:
                    raw = f.get_tensor(prefix + name)
                    cast = _cast(raw, self.dtype)
                    # memory of its own, not the mapped file's pages: a solved weight's replacement
                    # then frees the original instead of adding to the mapping, which stays resident
                    state[name] = raw.clone() if cast is raw else cast
        check_finite(((prefix + n, t) for n, t in state.items()), str(self.files[prefix + names[0]].parent),
                     only=self.finite_names)
        block.load_state_dict(state, strict=True, assign=True)

    def release(self, block: nn.Module) -> None:
        """Drop the block's weights: every parameter and persistent buffer goes back to the meta device."""
        _to_meta(block, block.state_dict().keys())

    def load_outside(self) -> None:
        """(Re)read the tensors outside the blocks (embeddings, final norm, lm_head), tied ones once."""
        _load_outside(self.model, self.blocks_path + ".", self.files, self.dtype)

    def release_outside(self) -> None:
        """Drop the tensors outside the blocks while the blocks are compressed (they are only needed
        for the capture, a compressed lm_head and the checkpoint's rest.safetensors)."""
        prefix = self.blocks_path + "."
        _to_meta(self.model, [n for n in self.model.state_dict() if not n.startswith(prefix)])


def open_lazy(name_or_path: str, blocks_path: str | None = None, trust_remote_code: bool = False
              ) -> tuple[nn.Module, LazyBlocks]:
    """(model skeleton with the outside tensors loaded, reader of its blocks)."""
    from layerwise.models.families import resolve_family

    directory = resolve_local(name_or_path)
    model, files, dtype = _skeleton(directory, name_or_path, trust_remote_code)
    blocks_path = blocks_path or resolve_family(model).blocks
    _load_outside(model, blocks_path + ".", files, dtype)
    model.eval()
    log.info("lazy loading %s: %d tensors outside the blocks in memory, blocks read on demand", directory,
             sum(1 for n in model.state_dict() if not n.startswith(blocks_path + ".")))
    return model, LazyBlocks(model, blocks_path, files, dtype)


def _skeleton(directory: Path, name_or_path: str, trust_remote_code: bool) -> tuple[nn.Module, dict[str, Path], torch.dtype]:
    """(the model on the meta device but for its computed buffers, tensor name → file, stored dtype)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    files = weight_files(directory)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a model config from {name_or_path!r}: {str(e).splitlines()[0]}") from None
    dtype = _stored_dtype(config, files)
    try:
        with init_empty_weights(include_buffers=False):  # buffers (rotary inv_freq) are computed for real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ModelError(f"{name_or_path!r} is not a causal language model transformers can build: {str(e).splitlines()[0]}") from None
    check_causal(model, name_or_path)  # before any weight is read: an encoder's names differ anyway
    return model, files, dtype


def check_headers(directory: Path, name_or_path: str, trust_remote_code: bool = False, lazy: bool = True) -> None:
    """Refuse weights that cannot give the model its tensors, from the safetensors headers alone (no
    data is read): every shard readable, every tensor the skeleton needs present with its shape and
    a floating dtype. lazy: this reader loads them, so persistent buffers count and names must match
    exactly; else transformers does (buffers keep their computed values, a base model's names lack
    the `base_model_prefix`)."""
    from layerwise.models.families import resolve_family

    from .linears import refuse_expert_tensors

    model, files, _ = _skeleton(directory, name_or_path, trust_remote_code)
    blocks = resolve_family(model).blocks
    for i, block in enumerate(model.get_submodule(blocks)):  # the files name fused experts per expert: say why first
        refuse_expert_tensors(block, f"{blocks}.{i}")
    model.tie_weights()  # tied names become one tensor, which the files hold once
    held: dict[Path, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for shard in sorted(set(files.values())):
        with _reading(shard) as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            held[shard] = {name: (t.get_dtype(), tuple(t.get_shape())) for name, t in slices.items()}
    prefix = f"{model.base_model_prefix}." if not lazy and model.base_model_prefix else None
    for names, tensor in _needed(model, buffers=lazy):
        stored = [n for n in names if n in files]
        if not stored and prefix:  # saved from the base model: transformers adds the prefix when loading
            stored = [n.removeprefix(prefix) for n in names if n.startswith(prefix) and n.removeprefix(prefix) in files]
        if not stored:
            hint = " (or pass --eager-load if transformers renames this model's tensors when loading)" if lazy else ""
            raise ModelError(f"no weight file in {directory} holds the tensor {names[0]!r} the model needs; the "
                             f"download is incomplete or config.json describes another model: download or save it again{hint}")
        for name in stored:
            _check_header(name, files[name], held[files[name]].get(name), tensor)


def _needed(model: nn.Module, buffers: bool):
    """(names, tensor) per tensor the model loads; tied names (one tensor under several names) together."""
    groups: dict[int, list[str]] = {}
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    parameters = {id(p) for p in model.parameters()}
    return [(names, tensors[key]) for key, names in groups.items() if buffers or key in parameters]


def _check_header(name: str, shard: Path, header: tuple | None, tensor: torch.Tensor) -> None:
    if header is None:
        raise ModelError(f"the shard {shard.name} has no tensor {name!r}, which {INDEX} places there; download or "
                         "save the model again")
    kind, shape = header
    if shape != tuple(tensor.shape):
        raise ModelError(f"the tensor {name!r} in {shard.name} has shape {list(shape)} but config.json needs "
                         f"{list(tensor.shape)}; the directory mixes two models, download or save it again")
    if tensor.is_floating_point() and not kind.startswith(("F", "BF")):
        raise ModelError(f"the tensor {name!r} in {shard.name} is stored as {kind}, not floating point; layerwise "
                         "compresses float16/bfloat16/float32 weights (not a model quantized already)")


def _load_outside(model: nn.Module, block_prefix: str, files: dict[str, Path], dtype: torch.dtype) -> None:
    wanted = [n for n in model.state_dict() if not n.startswith(block_prefix)]
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {}
    for name in wanted:
        if name not in files:
            if tied and name.endswith("lm_head.weight"):
                continue  # one tensor, tied below
            raise ModelError(f"the checkpoint has no tensor {name!r}; pass --eager-load to load it through transformers")
        with _reading(files[name]) as f:
            state[name] = _cast(f.get_tensor(name), dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    left = [n for n, t in model.state_dict().items() if not n.startswith(block_prefix) and t.is_meta]
    if left:
        raise ModelError(f"tensors outside the blocks were not loaded: {left[:3]}")


def _to_meta(module: nn.Module, names) -> None:
    state = module.state_dict()
    module.load_state_dict({n: torch.empty_like(state[n], device="meta") for n in names}, strict=False, assign=True)


def _stored_dtype(config, files: dict[str, Path]) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` would choose: the config's, else the first floating tensor's."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for name, file in files.items():
        with _reading(file) as f:
            t = f.get_slice(name)
            kind = t.get_dtype()
        if kind in ("F16", "BF16", "F32"):
            return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[kind]
    return torch.float32


@contextlib.contextmanager
def _reading(file: Path):
    """safe_open, with a damaged file (truncated, bad header, empty) as one ModelError line."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ModelError(f"the weights in {file} are not a readable safetensors file ({str(e).splitlines()[0]}); "
                         "download or save the model again") from None


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
