"""The architecture matrix's models: each decoder family as a tiny random model built offline
from its config (a few layers, small widths, seeded), its 2-D and 3-D weights scaled up so
that fp32 logits are peaked and int4 RTN visibly hurts (default inits give near-uniform logits
on which every quantizer looks perfect).

`DECODERS`, `ENCODERS` and `ENCODER_DECODERS` are the lists: the matrix tests loop over them,
and the README's table of supported architectures is generated from them
(scripts/architectures_table.py), so a family added here is tested and listed without another
edit.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

V = 256
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=128, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)

# model_type -> (config keywords over BASE, weight scale). None instead of a dict: the family's
# own keywords alone (its config does not take BASE's names).
DECODERS: dict[str, tuple[dict | None, float]] = {
    "llama": ({}, 4.0), "mistral": ({}, 4.0), "qwen2": ({}, 4.0), "qwen3": ({}, 4.0), "gemma2": ({}, 4.0),
    "gemma3_text": ({}, 4.0), "phi3": ({}, 4.0), "olmo2": ({}, 4.0), "starcoder2": ({}, 4.0),
    "granite": (dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=0.5),
                4.0),  # its four multipliers away from 1, so a file that drops one is caught
    "gpt2": (None, 4.0), "gpt_neox": ({}, 4.0), "falcon": (None, 4.0),
    # mixtures of experts: fused 3-D expert tensors, quantized one expert at a time
    "mixtral": (MOE, 4.0), "qwen3_moe": (MOE, 4.0), "gpt_oss": (MOE, 4.0),
    "deepseek_v3": ({**MOE, "n_routed_experts": 4, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                     "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                     "v_head_dim": 16, "head_dim": 8}, 3.0),  # its router flips experts at 4x: 3x keeps it smooth
}
OWN = {"gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=V),
       "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V)}
ENCODERS = ("bert", "roberta")  # tests/architectures/test_encoders.py
ENCODER_DECODERS = ("t5",)  # calibrated methods refuse its two stacks of blocks: rtn only
MOE_KINDS = tuple(k for k, (kw, _) in DECODERS.items() if kw is not None and "num_experts_per_tok" in kw)


def config(kind: str, **over):
    kw, _ = DECODERS[kind]
    return AutoConfig.for_model(kind, **{**(OWN[kind] if kw is None else {**BASE, **kw}), **over})


def tiny(kind: str, **over) -> torch.nn.Module:
    """The family's tiny model, seeded, weights scaled by the family's factor (`over`: config
    keywords to change, e.g. the vocabulary of a real tokenizer)."""
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(config(kind, **over)).eval()
    scale = DECODERS[kind][1]
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return m


ENCODER_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                    max_position_embeddings=64)


def tiny_encoder(kind: str, auto, **over) -> torch.nn.Module:
    """An encoder family's tiny model (`auto`: AutoModel, AutoModelForMaskedLM, ...), seeded,
    its 2-D weights scaled by 3 so that int4 visibly hurts."""
    torch.manual_seed(0)
    m = auto.from_config(AutoConfig.for_model(kind, **{**ENCODER_BASE, **over})).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return m


def ids(seed: int, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def kld(logits: torch.Tensor, ref: torch.Tensor) -> float:
    """KL(ref || logits) per token, batch mean."""
    return float(torch.nn.functional.kl_div(logits.flatten(0, -2).log_softmax(-1), ref.flatten(0, -2).log_softmax(-1),
                                            log_target=True, reduction="batchmean"))
