"""The tokenizer in a GGUF's metadata, as llama.cpp reads it back: byte-level BPE (GPT-2 style:
SmolLM2, Qwen, Llama 3) as its "gpt2" model with the merges; SentencePiece-style BPE (byte
fallback, "▁" for spaces: Llama 2, Gemma) as its "llama" model, whose merge order is the tokens'
scores — rebuilt from the merges, the first merge making a token scoring highest — so that
llama.cpp splits text as the Hugging Face tokenizer does."""

from __future__ import annotations

import json
import logging

from ..errors import ModelError

log = logging.getLogger(__name__)


def write_vocabulary(writer, source: str, vocab_size: int) -> None:
    """Tokens by id, their types, the merges or scores, and the special ids (gguf-py's SpecialVocab
    reads those from the tokenizer files)."""
    import gguf

    from ..loading import load_tokenizer

    tokenizer = load_tokenizer(source)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    fallback = bool(spec.get("model", {}).get("byte_fallback"))
    sentencepiece = fallback and _spaces_as_metaspace(spec)
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel" and not fallback
    if spec.get("model", {}).get("type") != "BPE" or not (sentencepiece or byte_level):
        raise ModelError("--format gguf writes BPE tokenizers, byte-level (GPT-2 style: SmolLM2's, Qwen's, Llama "
                         "3's) or SentencePiece-style (byte fallback, '▁' for spaces: Llama 2's, Gemma's); this "
                         "model's is neither")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {t["id"] for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(_token_type(gguf, i, token, special, added, sentencepiece))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(_scores(spec["model"], tokens))
        writer.add_add_space_prefix(_prepends_space(spec.get("normalizer")))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(spec))
    gguf.SpecialVocab(source, load_merges=not sentencepiece, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _token_type(gguf, i: int, token, special: set, added: set, sentencepiece: bool):
    if token is None:
        return gguf.TokenType.UNUSED
    if i in special:
        return gguf.TokenType.CONTROL
    if sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return gguf.TokenType.BYTE
    if i in added:
        return gguf.TokenType.USER_DEFINED
    return gguf.TokenType.NORMAL


def _scores(model: dict, tokens: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined token scores highest;
    BPE merges the pair of lowest rank: score = −(rank of the first merge that makes the token)."""
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    made: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        made.setdefault(left + right, rank)
    floor = -float(len(merges))  # tokens no merge makes (characters, bytes, specials) never compete as merges
    return [-float(made[t]) if t in made else floor for t in tokens]


def _steps(part) -> list[dict]:
    """The steps of a tokenizer.json normalizer or pre-tokenizer (a Sequence's, or itself; none: [])."""
    part = part or {}
    return part.get("normalizers") or part.get("pretokenizers") or ([part] if part else [])


def _spaces_as_metaspace(spec: dict) -> bool:
    """Whether spaces become "▁" (a normalizer's Replace, or a Metaspace pre-tokenizer)."""
    replaced = any(s.get("type") == "Replace" and s.get("content") == "\u2581" for s in _steps(spec.get("normalizer")))
    return replaced or any(s.get("type") == "Metaspace" for s in _steps(spec.get("pre_tokenizer")))


def _prepends_space(normalizer) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2's Prepend; Gemma's does not)."""
    return any(step.get("type") == "Prepend" for step in _steps(normalizer))


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name of the split before BPE: GPT-2's regex when the tokenizer uses it, else its
    generic one (text may then split differently from Hugging Face's; token ids are unaffected)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    log.warning("gguf: the tokenizer's pre-tokenizer is not GPT-2's; llama.cpp will split text with its default rule")
    return "default"
