"""fusedgpt's own models: one GPT decoder (gpt.py) for GPT-2, OPT and GPT-Neo, per-family adapters that
convert Hugging Face configs and checkpoints (gpt2.py, opt.py, gpt_neo.py), and the loaders
(loading.py)."""

from fusedgpt.models.gpt import GPT, GPTConfig
from fusedgpt.models.loading import convert_config, from_config, from_hf, from_pretrained, load_tokenizer

__all__ = ["GPT", "GPTConfig", "convert_config", "from_config", "from_hf", "from_pretrained", "load_tokenizer"]
