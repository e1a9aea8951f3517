"""Tiny random causal LMs of every family unipruner.hosts.hf_attention supports (built from configs, no weights)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 128
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"]


def tiny_lm(family: str, attn: str = "sdpa") -> transformers.PreTrainedModel:
    """A 2-layer (Gemma 3: 4-layer, one full-attention layer) model with GQA (4 query, 2 KV heads), seeded."""
    common = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=512)
    if family == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, **common)
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(num_hidden_layers=2, sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(num_hidden_layers=2, **common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(num_hidden_layers=2, head_dim=16, **common)
        cls = transformers.Qwen3ForCausalLM
    elif family == "phi3":
        cfg = transformers.Phi3Config(num_hidden_layers=2, pad_token_id=0, **common)
        cls = transformers.Phi3ForCausalLM
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(num_hidden_layers=4, head_dim=16, sliding_window=8,
                                            layer_types=["sliding_attention", "sliding_attention",
                                                         "full_attention", "sliding_attention"],
                                            query_pre_attn_scalar=16, **common)
        cls = transformers.Gemma3ForCausalLM
    else:  # pragma: no cover
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def left_padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids ``[B, max(lengths)]`` left-padded with 0, and their 0/1 attention mask."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):  # building test input
        mask[i, n - length:] = 1
        ids[i, : n - length] = 0
    return ids, mask
