"""Build the ~400 M-parameter random Llama the speed benchmarks use (never committed).

    python benchmarks/make_random_llama.py ~/.cache/random-llama-377m

8 blocks, hidden 2048, 32 heads (8 KV heads), MLP 5632, the reference model's 4096-token tokenizer
(../shared/models/wt2-llama-4l), untied embeddings: 377 M parameters, float16, weights from
transformers' own initialisation under torch.manual_seed(0). Random weights make perplexity
meaningless: it is for timing only.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "wt2-llama-4l"


def main(out: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, float16")


if __name__ == "__main__":
    main(str(Path(sys.argv[1]).expanduser()))
