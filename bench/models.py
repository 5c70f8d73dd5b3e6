"""Real-size model configs (random weights) for the end-to-end benchmarks, bench_generate.py and
bench_patching.py: built in code, so nothing is downloaded. Sizes as published (gpt2, facebook/opt-*,
EleutherAI/gpt-neo-*); tests/test_bench.py holds them to the published parameter counts."""

from __future__ import annotations


def _gpt2_124m():
    import transformers

    return transformers.GPT2Config()  # the defaults are GPT-2 small: 768 wide, 12 layers, 12 heads, 1024 positions


def _opt(hidden: int, layers: int, heads: int):
    import transformers

    return transformers.OPTConfig(vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
                                  num_attention_heads=heads, word_embed_proj_dim=hidden, max_position_embeddings=2048,
                                  do_layer_norm_before=True, activation_function="relu")


def _gpt_neo(hidden: int, layers: int, heads: int):
    import transformers

    return transformers.GPTNeoConfig(vocab_size=50257, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                     attention_types=[[["global", "local"], layers // 2]], window_size=256,
                                     max_position_embeddings=2048, activation_function="gelu_new")


# name -> a function building a fresh transformers config
MODEL_CONFIGS = {
    "gpt2-124m": _gpt2_124m,
    "opt-125m": lambda: _opt(768, 12, 12),
    "gpt-neo-125m": lambda: _gpt_neo(768, 12, 12),
    "opt-1.3b": lambda: _opt(2048, 24, 32),
    "gpt-neo-1.3b": lambda: _gpt_neo(2048, 24, 16),
}
