"""fusedgpt's own models: one GPT decoder (gpt.py) for GPT-2, OPT and GPT-Neo, per-family adapters that
convert Hugging Face configs and checkpoints (gpt2.py, opt.py, gpt_neo.py, with what they share in
convert.py), and the loaders (loading.py). Nothing here imports fusedgpt.generation: generation builds
on the models (and gives GPT its generate method), not the reverse."""

from fusedgpt.models.gpt import GPT, GPTConfig
from fusedgpt.models.loading import convert_config, from_config, from_hf, from_pretrained, load_tokenizer

__all__ = ["GPT", "GPTConfig", "convert_config", "from_config", "from_hf", "from_pretrained", "load_tokenizer"]
