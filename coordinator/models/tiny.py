"""Tiny seeded MoE checkpoints of real transformers families, for the demo and the tests.

Random weights from a fixed seed, saved with `save_pretrained` (per-expert keys, or stacked
with `stacked=True`), plus a small byte-level BPE tokenizer trained in-process: no hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)

# DeepSeek: a dense first layer, shared experts, group-limited routing, MLA attention
_DEEPSEEK = dict(
    _COMMON,
    num_hidden_layers=3,
    intermediate_size=64,
    moe_intermediate_size=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    num_key_value_heads=4,
)

# One small config per family; each keeps the family's own routing features switched on.
FAMILIES: dict[str, dict] = {
    "mixtral": dict(_COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "phimoe": dict(_COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        _COMMON,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "qwen3_moe": dict(
        _COMMON,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=16,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "olmoe": dict(_COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5, q_lora_rank=None),
    "deepseek_v3": dict(_DEEPSEEK, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=24),
    "gpt_oss": dict(
        _COMMON,
        intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "granitemoe": dict(_COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    # Llama4: top-1 sigmoid routing that scales the expert's input, a shared expert, MoE on
    # every second layer (1 and 3; 0 and 2 dense), chunked attention and a NoPE layer (3)
    "llama4_text": dict(
        _COMMON,
        num_hidden_layers=4,
        intermediate_size=32,
        intermediate_size_mlp=64,
        num_local_experts=8,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        head_dim=16,
        attention_chunk_size=8,
    ),
}


def build_tokenizer():
    """A deterministic byte-level BPE tokenizer (VOCAB tokens) trained on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the swarm of experts computes every token it is given and returns it in order"] * 4 + [
        "a mixture of experts routes each token to a few experts chosen by a router",
        "volunteers host experts on home machines and coordinators run the dense trunk",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"no tiny config for {family!r}; known: {sorted(FAMILIES)}")
    config = AutoConfig.for_model(family, **{**FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        # random init is N(0, 0.02): too flat for routing to matter; widen it (seeded) so
        # routers pick clearly different experts for different tokens
        for name, p in model.named_parameters():
            if p.dim() > 1 and "norm" not in name:
                p.normal_(0.0, 0.2)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def save_tiny_checkpoint(
    path: str | Path, family: str, seed: int = 0, stacked: bool = False, dtype: torch.dtype = torch.float32, **overrides
) -> Path:
    path = Path(path)
    model = build_tiny_model(family, seed, dtype, **overrides)
    model.save_pretrained(path, save_original_format=not stacked)
    build_tokenizer().save_pretrained(path)
    return path


def ensure_tiny_checkpoint(cache: Path, family: str, seed: int) -> Path:
    """Build the seeded checkpoint once; reuse it afterwards."""
    path = cache / f"tiny-{family}-s{seed}"
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        save_tiny_checkpoint(path, family, seed=seed)
    return path
