"""Building fusedgpt models: from a local Hugging Face checkpoint directory (from_pretrained), from an
in-memory transformers model (from_hf) or from a config alone (from_config, random weights), and the
tokenizer of a checkpoint directory (load_tokenizer). Nothing is fetched from a network: a missing file
is a FileNotFoundError that names it.

The family adapters (gpt2.py, opt.py, gpt_neo.py) do the config conversion and key remapping; this
module finds and reads the files, casts and places the tensors and checks that every weight is there.
Models come back in eval mode with parameters that do not require grad (for inference; a model set to
train with requires_grad_(True) trains through each op's backward, see fusedgpt.ops._backend.decide).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from fusedgpt.models import gpt2, gpt_neo, opt
from fusedgpt.models.gpt import GPT, GPTConfig

ADAPTERS = {module.MODEL_TYPE: module for module in (gpt2, opt, gpt_neo)}

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, a torch floating dtype or one of DTYPES' names -> torch.dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"dtype must be a floating dtype (float16, bfloat16, float32), got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be a torch dtype or one of {sorted(DTYPES)}, got {dtype!r}")


def _adapter(hf_config: dict):
    model_type = hf_config.get("model_type")
    if model_type not in ADAPTERS:
        raise ValueError(f"model_type {model_type!r} is not supported; fusedgpt runs {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]


def _config_dict(hf_config) -> dict:
    """A Hugging Face config as a dict: a dict as is, a transformers PretrainedConfig via to_dict()."""
    if isinstance(hf_config, dict):
        return hf_config
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a config dict or a transformers config, got {type(hf_config).__name__}")


def convert_config(hf_config) -> GPTConfig:
    """A Hugging Face GPT-2 / OPT / GPT-Neo config (dict or transformers config) -> GPTConfig."""
    hf_config = _config_dict(hf_config)
    return _adapter(hf_config).convert_config(hf_config)


def from_config(config, dtype=None, device=None) -> GPT:
    """A model with random weights (normal(0, 0.02), zero biases) from a GPTConfig or a Hugging Face
    config (dict or transformers config): for tests and benchmarks. dtype defaults to float32."""
    if not isinstance(config, GPTConfig):
        config = convert_config(config)
    with torch.device(device if device is not None else "cpu"):
        model = GPT(config)
    return _finish(model.to(dtype=resolve_dtype(dtype) or torch.float32))


def _finish(model: GPT) -> GPT:
    model.lay_out_matrices()  # load_state_dict(assign=True) keeps the checkpoint's layout
    model.requires_grad_(False)
    return model.eval()


def _build(hf_config: dict, state: dict, dtype: torch.dtype | None, device, *, copy: bool, source: str) -> GPT:
    """Converts a Hugging Face state dict and assigns it to a GPT built on the meta device (no second
    allocation). copy=True guarantees no tensor aliases one of `state`'s."""
    adapter = _adapter(hf_config)
    config = adapter.convert_config(hf_config)
    try:
        converted, unused = adapter.convert_state_dict(state, config)
    except KeyError as error:
        raise ValueError(f"{source} does not match its {config.family} config: {error.args[0]}") from None
    if unused:
        warnings.warn(f"fusedgpt: {source}: {len(unused)} tensors unused by the {config.family} model, e.g. "
                      f"{unused[:4]}", stacklevel=3)
    if dtype is None:  # the checkpoint's own floating dtype
        dtype = next(t.dtype for t in converted.values() if t.is_floating_point())
    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    for name, tensor in converted.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise ValueError(f"{source}: tensor for {name} has shape {tuple(tensor.shape)}, the config implies "
                             f"{tuple(expected[name].shape)}")
        placed = tensor.to(device=device, dtype=dtype).contiguous()
        if copy and placed.data_ptr() == tensor.data_ptr():
            placed = placed.clone()
        converted[name] = placed
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ValueError(f"{source} has no weights for {missing[:8]}")
    model.load_state_dict(converted, strict=True, assign=True)
    return _finish(model)


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from a file; a missing, unreadable or malformed file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def resolve_device(device) -> torch.device:
    """None (the CPU), a torch.device or a string -> a torch.device that exists on this machine."""
    try:
        resolved = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device: {error}") from None
    if resolved.type == "cpu" and resolved.index not in (None, 0):
        raise ValueError(f"device {device!r} does not exist: the CPU is device cpu (or cpu:0)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is visible")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible")
    return resolved


def _checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred, sharded or not."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            weight_map = _read_json(directory / index, "checkpoint index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{directory / index} has no weight_map")
            root = directory.resolve()
            files = []
            for name in dict.fromkeys(weight_map.values()):
                file = directory / name if isinstance(name, str) else None
                if file is None or not file.resolve().is_relative_to(root):
                    raise ValueError(f"{directory / index}: weight_map entry {name!r} is not a file inside {directory}; "
                                     "refusing to read outside the checkpoint directory")
                files.append(file)
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"checkpoint shard not found: {file} (listed in {directory / index})")
            return files
    raise FileNotFoundError(f"no weights in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} "
                            f"or {TORCH_BIN_INDEX}")


def _load_file(file: Path, device) -> dict[str, torch.Tensor]:
    """The tensors of one weight file; a truncated or corrupt file is a ValueError naming it."""
    load_device = str(torch.device(device)) if device is not None else "cpu"
    try:
        if file.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(file), device=load_device)
        else:
            state = torch.load(file, map_location=load_device, weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as error:  # safetensors' SafetensorError, pickle's UnpicklingError, torch's RuntimeError
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{file} cannot be read (truncated or corrupt?): {first_line}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    return state


def from_pretrained(path, dtype=None, device=None) -> GPT:
    """A fusedgpt model from a local Hugging Face checkpoint directory: config.json plus
    model.safetensors, model.safetensors.index.json with its shards, pytorch_model.bin (read with
    torch.load(weights_only=True)) or pytorch_model.bin.index.json with its shards.

    dtype: torch dtype or name ("float16", "bfloat16", "float32"); None keeps the checkpoint's dtype.
    device: where the weights go (loaded there directly); None is the CPU. model_type must be "gpt2",
    "opt" or "gpt_neo". Nothing is downloaded: `path` must be a directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory} (fusedgpt loads local directories "
                                "only; download the model first)")
    hf_config = _read_json(directory / "config.json", "config.json")
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    _adapter(hf_config)  # an unsupported model_type fails before any weight is read
    state: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(directory):
        state.update(_load_file(file, device))
    return _build(hf_config, state, dtype, device, copy=False, source=str(directory))


def from_hf(model, dtype=None, device=None) -> GPT:
    """A fusedgpt model from an in-memory transformers GPT2LMHeadModel, OPTForCausalLM or
    GPTNeoForCausalLM. The weights are COPIED (q/k/v are fused into one matrix and GPT-2's Conv1D
    weights transposed, so new tensors are needed anyway): the two models are independent afterwards,
    and both occupy memory while both are alive. dtype and device default to the Hugging Face model's."""
    for attribute in ("config", "state_dict"):
        if not hasattr(model, attribute):
            raise TypeError(f"from_hf expects a transformers model, got {type(model).__name__}")
    first = next(model.parameters())
    dtype = resolve_dtype(dtype) or first.dtype
    device = device if device is not None else first.device
    with torch.no_grad():
        return _build(_config_dict(model.config), model.state_dict(), dtype, device, copy=True,
                      source=f"the {type(model).__name__}")


def _token_content(value) -> str | None:
    """A special token from tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path):
    """The checkpoint directory's tokenizer as a `tokenizers.Tokenizer`: tokenizer.json when present,
    else the byte-level BPE of vocab.json + merges.txt (GPT-2 / OPT / GPT-Neo). A leading BOS is added
    when tokenizer_config.json says add_bos_token, and by default for OPT (config.json's model_type),
    whose prompts start with `</s>` (id 2); special tokens named in tokenizer_config.json are kept whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    settings, model_config = ({} if not (directory / name).is_file() else _read_json(directory / name, name)
                              for name in ("tokenizer_config.json", "config.json"))
    model_type = model_config.get("model_type")
    if (directory / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as error:  # the tokenizers library raises a plain Exception
            raise ValueError(f"{directory / 'tokenizer.json'} cannot be read as a tokenizer: {error}") from None
    else:
        missing = [name for name in ("vocab.json", "merges.txt") if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"no tokenizer in {directory}: expected tokenizer.json, or vocab.json and "
                                    f"merges.txt (missing: {', '.join(missing)})")
        try:
            tokenizer = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
        except Exception as error:
            raise ValueError(f"{directory / 'vocab.json'} and merges.txt cannot be read as a BPE tokenizer: "
                             f"{error}") from None
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(settings.get("add_prefix_space")))
        tokenizer.decoder = decoders.ByteLevel()
        specials = [_token_content(settings.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")]
        specials = [token for token in dict.fromkeys(specials) if token and tokenizer.token_to_id(token) is not None]
        tokenizer.add_special_tokens(specials)
    add_bos = settings.get("add_bos_token", model_type == "opt")
    bos = _token_content(settings.get("bos_token")) or ("</s>" if model_type == "opt" else "<|endoftext|>")
    bos_id = tokenizer.token_to_id(bos)
    if add_bos and bos_id is not None and tokenizer.encode("a").ids[:1] != [bos_id]:
        tokenizer.add_special_tokens([bos])  # kept whole in text, dropped by decode(skip_special_tokens=True)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)])
    return tokenizer
