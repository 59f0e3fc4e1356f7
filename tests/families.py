"""Tiny random models of the architecture families kvchat must serve, built from transformers' own config classes.

Each has 4 layers; attention windows are 12 tokens, so they fill during the first turn.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvchat.weights.model import LoadedModel
from tiny import make_tokenizer

WINDOW = 12
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MAMBA2_HEADS = dict(mamba_d_state=16, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_expand=2)
_LATENT = dict(head_dim=None, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
               qk_nope_head_dim=16, v_head_dim=16)
_LINEAR = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)

# family name -> (model_type, config overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "mistral": ("mistral", dict(sliding_window=WINDOW)),
    "gemma3": ("gemma3_text", dict(sliding_window=WINDOW, layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    "gpt-oss": ("gpt_oss", dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                                layer_types=["sliding_attention", "full_attention"] * 2)),
    "gemma3n": ("gemma3n_text", dict(sliding_window=WINDOW, num_kv_shared_layers=2,
                                     layer_types=["sliding_attention", "full_attention"] * 2, laurel_rank=8,
                                     hidden_size_per_layer_input=8, altup_num_inputs=2,
                                     activation_sparsity_pattern=[0.0] * 4)),
    "qwen3.5": ("qwen3_5_text", dict(layer_types=["linear_attention"] * 3 + ["full_attention"], **_LINEAR)),
    "qwen3-next": ("qwen3_next", dict(layer_types=["linear_attention"] * 3 + ["full_attention"], num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=32, **_LINEAR)),
    "lfm2": ("lfm2", dict(layer_types=["conv", "conv", "full_attention", "conv"], block_ff_dim=128, conv_L_cache=3)),
    "granite-hybrid": ("granitemoehybrid", dict(layer_types=["mamba", "mamba", "attention", "mamba"],
                                                num_local_experts=0, shared_intermediate_size=128, **_MAMBA2_HEADS)),
    "falcon-h1": ("falcon_h1", dict(mamba_d_ssm=128, **_MAMBA2_HEADS)),
    "nemotron-h": ("nemotron_h", dict(layers_block_type=["mamba", "attention", "mlp", "mamba"], mamba_num_heads=8,
                                      mamba_head_dim=16, ssm_state_size=16, n_groups=1, expand=2)),
    "mamba2": ("mamba2", dict(state_size=16, expand=2, num_heads=8, head_dim=16, n_groups=1)),
    "mamba": ("mamba", dict(state_size=16, expand=2)),
    "jamba": ("jamba", dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                            num_experts=2, mamba_d_state=16, mamba_expand=2)),
    "bailing-hybrid": ("bailing_hybrid", dict(layer_types=["linear_attention"] * 3 + ["full_attention"], num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                                              n_group=1, topk_group=1, short_conv_kernel_size=4, num_mtp_layers=0,
                                              **{**_LATENT, "head_dim": 16})),  # (the linear layers' head size)
    "bamba": ("bamba", dict(attn_layer_indices=[2], mamba_d_conv=4, mamba_chunk_size=16, **_MAMBA2_HEADS)),
    "deepseek-v3": ("deepseek_v3", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        first_k_dense_replace=1, n_group=1, topk_group=1, **_LATENT)),
    # index_topk covers the whole context: a top-k chosen from float32 scores flips on rounding noise (a prefix
    # prefilled alone and inside a longer prefill already select differently), so no reuse could match it.
    "deepseek-v3.2": ("deepseek_v32", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           first_k_dense_replace=1, n_group=1, topk_group=1, index_n_heads=2,
                                           index_head_dim=16, index_topk=4096, **_LATENT)),
}


# Models kvchat must refuse with a clear message: a cache class of their own (MiniMax, xLSTM), a forward pass
# that ignores the cache (openai-gpt), recurrent state kept on the modules (RecurrentGemma).
REFUSED: dict[str, tuple[str, dict]] = {
    "minimax": ("minimax", dict(layer_types=["linear_attention", "full_attention"] * 2, num_local_experts=2,
                                num_experts_per_tok=1)),
    "xlstm": ("xlstm", dict(embedding_dim=64, num_heads=4, num_blocks=2)),
    "openai-gpt": ("openai-gpt", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "recurrent-gemma": ("recurrent_gemma", dict(block_types=["recurrent", "attention"], attention_window_size=12,
                                                lru_width=64)),
}

SLIDING = ("mistral", "gemma3", "gpt-oss", "gemma3n")  # families with sliding-window layers


def window_cache(loaded: LoadedModel) -> str:
    """How an engine for `loaded` keeps sliding-window layers: "window" for a family named 'NAME:window'."""
    return "window" if loaded.name.endswith(":window") else "full"


def make_family(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> LoadedModel:
    """A tiny random model of family `name` with the tests' byte-level ChatML tokenizer.

    'NAME:window' is the same model, to be run with window-only sliding layers (see `window_cache`).
    """
    model_type, overrides = {**FAMILIES, **REFUSED}[name.split(":")[0]]
    tok = make_tokenizer()
    settings = {key: value for key, value in {**_COMMON, **overrides}.items() if value is not None}
    if model_type == "gemma3n_text":
        settings["vocab_size_per_layer_input"] = len(tok)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), experts_implementation="eager", **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.generation_config.eos_token_id = 2
    return LoadedModel(model=model, tokenizer=tok, name=f"tiny-{name}", device=torch.device("cpu"), dtype=dtype)
