"""GGUF: one file llama.cpp loads, each compressed layer in the block type holding its codes
(`gguf_blocks`), the rest as convert_hf_to_gguf writes it: tensor names from gguf-py's map,
Llama's q/k rows permuted to llama.cpp's rope layout (a row permutation: codes stay exact), 1-D
tensors float32, other matrices float16, the hyperparameters and the tokenizer in the metadata."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..errors import ModelError
from ..formats import CompressedWeight
from ..outputs import publish, scratch_directory
from .gguf_blocks import block_bytes, gguf_decoded, gguf_type, pack_rows
from .gguf_rope import write_rope
from .gguf_vocab import write_vocabulary
from .headers import gguf_tensor_info_bytes, provenance_bytes
from .protocol import ExportOptions
from .tally import Tally, check_family, largest_difference

log = logging.getLogger(__name__)

# model_type → (gguf-py architecture, whether q/k rows take Llama's rope permutation)
FAMILIES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False),
            "phi3": ("PHI3", False),  # fused qkv_proj / gate_up_proj are llama.cpp's attn_qkv / ffn_up as they are
            "gemma3_text": ("GEMMA3", False)}
NORM_SHIFT = {"gemma3_text": 1.0}  # llama.cpp multiplies by the norm weight, Gemma by (1 + weight)
KEEPS_WINDOW = {"gemma3_text"}  # families whose sliding window llama.cpp applies (it ignores Phi-3's)
GEMMA3_PATTERN = 6  # llama.cpp's Gemma 3: every 6th layer global, the others sliding, local rope base 10000
HEADER_BYTES_PER_TOKEN = 32  # tokenizer metadata per vocabulary entry (string, type, merge), measured


def rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's rope wants of q_proj / k_proj (convert_hf_to_gguf's `permute`): in each
    head, the first and second halves interleaved. new[h, 2i + j] = old[h, j·half + i]."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, 2, half).transpose(1, 2).reshape(-1)


def permuted(cw: CompressedWeight, order: torch.Tensor) -> CompressedWeight:
    """`cw` with its output rows in `order`: an affine layer's codes, scales, zero points and mask
    follow; any other goes F16 anyway, so its dense values move."""
    if cw.scheme != "affine":
        return CompressedWeight(cw.shape, "dense", values=cw.dequantize()[order])
    return CompressedWeight(cw.shape, "affine", cw.bits, codes=cw.codes[order], scale=cw.scale[order],
                            zero_point=cw.zero_point[order], mask=None if cw.mask is None else cw.mask[order])


class GGUF:
    name = "gguf"
    suffix = ".gguf"

    def check(self, out: Path, options: ExportOptions) -> None:
        if Path(out).suffix != self.suffix:
            raise ModelError(f"--out {out} must end in {self.suffix}")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ModelError("--format gguf needs the gguf package: pip install gguf") from None

    def tokenizer_dir(self, out: Path) -> None:
        return None  # the vocabulary is in the file's metadata

    def export(self, loaded, out: Path, options: ExportOptions) -> dict:
        import gguf

        start = time.time()
        model_type = check_family(loaded.model, tuple(FAMILIES), self.name)
        arch = getattr(gguf.MODEL_ARCH, FAMILIES[model_type][0])
        out = Path(out)
        with scratch_directory(out) as scratch:
            path = scratch / out.name
            writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
            _metadata(writer, loaded.model.config, options)
            if model_type == "gemma3_text":
                _gemma3_metadata(writer, loaded.model.config)
            write_vocabulary(writer, options.source, loaded.model.config.vocab_size)
            tally = _tensors(writer, loaded, gguf.get_tensor_name_map(arch, loaded.model.config.num_hidden_layers),
                             FAMILIES[model_type][1], NORM_SHIFT.get(model_type, 0.0))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            size = path.stat().st_size
            publish(path, out)
        return {"path": str(out), "seconds": time.time() - start, "size_bytes": size,
                "summary": tally.summary(self.name, "gguf"), "layers": tally.as_dict()}

    def layer_bytes(self, cw: CompressedWeight) -> int:
        return block_bytes(cw)

    def fixed_bytes(self, model, budgeted: list[str]) -> int:
        skip = {f"{n}.weight" for n in budgeted}
        weights = sum(p.numel() * (4 if p.dim() == 1 else 2) for n, p in model.named_parameters() if n not in skip)
        # the Hugging Face names are longer than llama.cpp's: an upper bound on the tensor directory
        directory = sum(gguf_tensor_info_bytes(n, p.dim()) for n, p in model.named_parameters())
        return weights + HEADER_BYTES_PER_TOKEN * model.config.vocab_size + directory + provenance_bytes(budgeted)


def _tensors(writer, loaded, names, permute: bool, norm_shift: float = 0.0) -> Tally:
    """Every tensor of the model into `writer` under llama.cpp's name; the tally of the compressed ones.
    norm_shift: added to every norm weight (float32, as convert_hf_to_gguf does for Gemma)."""
    config = loaded.model.config
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    tally = Tally()
    for key, tensor in loaded.model.state_dict().items():
        if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"--format gguf: no llama.cpp name for tensor {key}")
        layer = key.rpartition(".")[0]
        order = None
        if permute and key.endswith(".weight") and layer.rpartition(".")[2] in heads:
            order = rope_permutation(tensor.shape[0], heads[layer.rpartition(".")[2]])
        cw = loaded.compressed.get(layer) if key.endswith(".weight") else None
        if cw is None:
            values = tensor if order is None else tensor[order]
            if norm_shift and key.endswith("norm.weight"):
                values = values.to(torch.float32) + norm_shift
            writer.add_tensor(name, values.to(torch.float32 if values.dim() == 1 else torch.float16).numpy())
        else:
            _compressed(writer, name, layer, cw if order is None else permuted(cw, order), tally)
            if loaded.spill is not None:
                loaded.spill.release_all()
    return tally


def _compressed(writer, name: str, layer: str, cw: CompressedWeight, tally: Tally) -> None:
    import gguf

    kind = gguf_type(cw)
    if kind is None:  # F16 holds our float16 weights exactly
        writer.add_tensor(name, cw.dequantize().numpy())
        source = f"{cw.bits}-bit blocks of {cw.block_size}" if cw.scheme == "affine" else cw.scheme
        tally.convert(source + (" sparse" if cw.mask is not None else ""), "F16", layer, 0.0)
        return
    writer.add_tensor(name, pack_rows(cw, kind), raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    tally.carried(kind, layer, largest_difference(cw, gguf_decoded(cw, kind)))


def _metadata(writer, config, options: ExportOptions) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(Path(options.source).name or "layerwise")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    write_rope(writer, config, head_dim)
    window = getattr(config, "sliding_window", None)
    if window and config.model_type in KEEPS_WINDOW:
        writer.add_sliding_window(window)
    elif window and window < config.max_position_embeddings:
        log.warning("gguf: llama.cpp attends to the whole context; the model's sliding window of %d is not kept", window)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for key, value in options.metadata.items():
        writer.add_string(key, value if isinstance(value, str) else str(value))


def _gemma3_metadata(writer, config) -> None:
    """What llama.cpp reads of Gemma 3 beyond the common keys; what it fixes itself must match."""
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    pattern = ["full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention" for i in range(layers)]
    rope = getattr(config, "rope_parameters", None) or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", 10000.0)
    problems = [f"layer_types {list(config.layer_types)} (llama.cpp: every {GEMMA3_PATTERN}th layer global)"
                if list(getattr(config, "layer_types", pattern)) != pattern else None,
                f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp scales by head_dim {head_dim})"
                if config.query_pre_attn_scalar != head_dim else None,
                f"local rope base {local} (llama.cpp: 10000)" if local != 10000.0 else None,
                "attention soft-capping" if getattr(config, "attn_logit_softcapping", None) else None]
    problems = [p for p in problems if p]
    if problems:
        raise ModelError(f"--format gguf: llama.cpp's Gemma 3 cannot hold this model's {problems[0]}")
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
