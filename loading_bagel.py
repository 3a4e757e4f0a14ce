"""Loading and saving BAGEL checkpoints in the released layout, through transformers' own loader.

The released repository holds `ema.safetensors` (every model weight, under `BagelModel`'s names),
`ae.safetensors` (the FLUX autoencoder under its own `encoder.*` / `decoder.*` names) and
`llm_config.json` + `vit_config.json` instead of a config.json. transformers'
`PreTrainedModel.from_pretrained` reads it as a sharded checkpoint: `model.safetensors.index.json`
maps every tensor to one of the two files, transformers adds the `model.` root of the ema names
itself (`base_model_prefix`), and `VAE_KEY_MAPPING` (a `key_mapping`) puts the VAE's names under
`vae.`. So `dtype`, `device_map` (offloading included), `max_memory`, `quantization_config`, ... are
transformers' own. `save_pretrained` writes the index next to the weights.

What remains here is what transformers' loader does not do:
* a directory without a usable config.json + index (a clone of the released repository) is loaded
  through a temporary directory holding a generated config.json and index, and links to the
  weight files;
* clear errors for missing or unreadable weight files, before any tensor is read;
* strict loading: transformers initialises missing weights and drops unexpected ones with a
  warning; BAGEL raises, naming them, unless `strict=False`;
* the processor (`model.processor`) and the released layout on save.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import os
import shutil
import struct
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from .configuration_bagel import BagelConfig, normalize_stage
from .state_dict_adapter import GEN_PATTERNS, BagelStateDictAdapter, checkpoint_bucket
from .validation_bagel import check_bool

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "ema.safetensors"
VAE_WEIGHTS_NAME = "ae.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
INDEX_NAME = "model.safetensors.index.json"
AUTO_MAP = {
    "AutoConfig": "configuration_bagel.BagelConfig",
    "AutoModel": "modeling_bagel.BagelForUnifiedMultimodal",
    "AutoProcessor": "processing_bagel.BagelProcessor",
}
#: Entry modules of the remote code; the modules they import relatively are found by parsing them.
REMOTE_CODE_ENTRY_FILES = ("configuration_bagel.py", "modeling_bagel.py", "processing_bagel.py")
#: Files whose presence means a checkpoint directory has a tokenizer (and so a processor).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
#: What a Hub download fetches besides the weights: configs, tokenizer / processor files, code, from
#: the checkpoint's own folder only (the repository's training/, tests/, docs/ ... are not loaded).
HUB_ALLOW_PATTERNS = ("*.json", "*.py", "*.txt", "*.model", "*.jinja", "*.tiktoken")
#: ae.safetensors keeps the FLUX autoencoder's own names; the model holds it as `vae`.
VAE_KEY_MAPPING = {r"^encoder\.": "vae.encoder.", r"^decoder\.": "vae.decoder."}
#: Modules quantization leaves in the model's dtype unless the user's config names its own: the
#: output embedding (as transformers does by default), the small generation-head projections and
#: time embedder, whose errors go straight into the predicted velocity, and the VAE. Full module
#: paths: transformers versions match them as prefixes, suffixes or substrings.
UNQUANTIZED_MODULES = [
    "model.language_model.lm_head",
    "model.llm2vae",
    "model.vae2llm",
    "model.time_embedder",
    "vae",
]
#: The reference's ViT with `rope=True` stores its 2-D rotary tables (deterministic, recomputed by
#: our `SiglipRotary2D`) as persistent buffers.
VIT_ROPE_TABLES = r"(^|\.)vit_model\.vision_model\.rope\.(cos|sin)_[hw]$"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


# ---- what the model tells transformers' loader ----------------------------------------------


class KeyPatterns(list):
    """Regexes of keys, as a list that also unions with a set: transformers 5.0 adds a list to
    `_keys_to_ignore_on_load_unexpected`, later 5.x versions union a set with it."""

    def __or__(self, other) -> set:
        return set(self) | set(other)

    __ror__ = __or__


def unexpected_key_patterns(config: BagelConfig) -> KeyPatterns:
    """Checkpoint keys this model deliberately has no place for (`_keys_to_ignore_on_load_unexpected`):
    stage 1 skips the generation weights and the VAE (they are never read), a model without
    `visual_und` the ViT, a rope ViT the reference's rotary tables."""
    optional_root = r"(^|\.)"
    patterns = []
    if not config.visual_gen:
        patterns += [optional_root + p.removeprefix("^") for p in GEN_PATTERNS] + [r"^vae\."]
    if not config.visual_und:
        patterns.append(optional_root + r"(vit_model|connector|vit_pos_embed)\.")
    elif config.vision_config is not None and getattr(config.vision_config, "rope", False):
        patterns.append(VIT_ROPE_TABLES)
    return KeyPatterns(patterns)


def with_unquantized_defaults(quantization_config: Any) -> Any:
    """The user's quantization config (object or dict), with `UNQUANTIZED_MODULES` as its skip list
    when it names none (bitsandbytes' `llm_int8_skip_modules`, torchao's and most others'
    `modules_to_not_convert`)."""
    is_dict = isinstance(quantization_config, dict)
    method = quantization_config.get("quant_method") if is_dict else getattr(quantization_config, "quant_method", None)
    name = (
        "llm_int8_skip_modules" if str(getattr(method, "value", method)) == "bitsandbytes" else "modules_to_not_convert"
    )
    if is_dict:
        if quantization_config.get(name) is not None:
            return quantization_config
        return {**quantization_config, name: list(UNQUANTIZED_MODULES)}
    if not hasattr(quantization_config, name) or getattr(quantization_config, name) is not None:
        return quantization_config
    quantization_config = copy.deepcopy(quantization_config)
    setattr(quantization_config, name, list(UNQUANTIZED_MODULES))
    return quantization_config


# ---- files ----------------------------------------------------------------------------------


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
    """`{key: (dtype, shape)}` of a safetensors file, read from its header alone (no tensor data).

    Raises a ValueError naming the file when it is not a complete safetensors file (a pickle, an
    empty or truncated file, a corrupt header).
    """
    path = Path(path)
    size = path.stat().st_size
    hint = (
        "re-download or re-save it; BAGEL weights must be safetensors files "
        "(ema.safetensors / ae.safetensors as released)"
    )
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file ({size} bytes, no header): {hint}.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise ValueError(
                f"{path} is not a safetensors file or is truncated (header of {header_len} bytes claimed in a file "
                f"of {size} bytes): {hint}."
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        info = {k: (_SAFETENSORS_DTYPES.get(v["dtype"]), tuple(int(d) for d in v["shape"])) for k, v in entries.items()}
    except Exception as err:  # noqa: BLE001 - any malformed header is the same user error
        raise ValueError(f"{path} is not a safetensors file (unreadable header: {err}): {hint}.") from err
    if 8 + header_len + end > size:
        raise ValueError(
            f"{path} is truncated: its header describes {8 + header_len + end} bytes but the file has {size}: {hint}."
        )
    return info


def resolve_checkpoint_dir(
    name_or_path: str | os.PathLike, subfolder: str, hub_kwargs: dict, stage: int | None
) -> Path:
    """A local directory as is; a Hub id through `snapshot_download` (configs, code, tokenizer files,
    ema.safetensors, and ae.safetensors unless stage 1 was asked for). A name that can only be a
    local path (no `owner/` part, a leading `.`, `/` or `~`, an existing first folder, more than one
    `/`) and is not a directory fails at once, without asking the network; so does a Hub id that
    neither the Hub nor (offline) the cache has."""
    local = Path(name_or_path) / subfolder if subfolder else Path(name_or_path)
    if local.is_dir():
        return local
    text = os.fspath(name_or_path)
    if Path(name_or_path).exists():
        raise NotADirectoryError(f"{text} is a file; pass the checkpoint directory that holds {WEIGHTS_NAME}.")
    wanted = (
        f"pass a local checkpoint directory (holding {WEIGHTS_NAME} and config.json or llm_config.json + "
        "vit_config.json) or a Hub repository id owner/name such as 'ByteDance-Seed/BAGEL-7B-MoT'"
    )
    owner = text.split("/", 1)[0]
    if (
        text.startswith((".", "/", "~"))
        or text.count("/") != 1
        or os.sep in text.replace("/", "")
        or Path(owner).is_dir()
    ):
        raise FileNotFoundError(f"No directory {local} (relative to {Path.cwd()}): {wanted}.")
    from huggingface_hub import constants, snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    weights = [WEIGHTS_NAME] if stage == 1 else [WEIGHTS_NAME, VAE_WEIGHTS_NAME]
    patterns = [prefix + p for p in (*HUB_ALLOW_PATTERNS, *weights)]
    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    try:
        root = snapshot_download(text, allow_patterns=patterns, ignore_patterns=[prefix + "*/*"], **kwargs)
    except Exception as err:  # noqa: BLE001 - not found, no network, offline without a cached copy, bad id
        offline = constants.HF_HUB_OFFLINE or kwargs.get("local_files_only")
        where = "the Hugging Face cache (offline: HF_HUB_OFFLINE or local_files_only)" if offline else "the Hub"
        raise FileNotFoundError(
            f"No directory {local} (relative to {Path.cwd()}), and {where} has no repository {text!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): {wanted}."
        ) from err
    return Path(root) / subfolder if subfolder else Path(root)


def weight_headers(directory: Path) -> dict[str, dict]:
    """`{file name: header}` of ema.safetensors (required) and ae.safetensors (when present), each
    checked to be a complete safetensors file."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        present = sorted(p.name for p in directory.iterdir())
        others = [n for n in present if n.endswith((".safetensors", ".bin", ".pt"))]
        extra = (
            f" It has {', '.join(others)}, which is not the BAGEL layout (save with "
            "BagelForUnifiedMultimodal.save_pretrained)."
            if others
            else ""
        )
        raise FileNotFoundError(
            f"No BAGEL weights in {directory}: {WEIGHTS_NAME} is missing.{extra} A BAGEL checkpoint directory holds "
            f"{WEIGHTS_NAME} (model weights), optionally {VAE_WEIGHTS_NAME} (VAE), and config.json or "
            "llm_config.json + vit_config.json; download the full checkpoint (e.g. ByteDance-Seed/BAGEL-7B-MoT)."
        )
    headers = {WEIGHTS_NAME: read_safetensors_header(weights)}
    if (directory / VAE_WEIGHTS_NAME).is_file():
        headers[VAE_WEIGHTS_NAME] = read_safetensors_header(directory / VAE_WEIGHTS_NAME)
    return headers


def build_index(headers: dict[str, dict]) -> dict:
    """The `model.safetensors.index.json` of the weight files: every tensor -> its file, and in
    its metadata the dtype of ema.safetensors, which transformers' `dtype="auto"` takes when the
    config names none (else it would take the first file's: the VAE's, often float32)."""
    weight_map, total = {}, 0
    for file, header in headers.items():
        for key, (dtype, shape) in header.items():
            weight_map[key] = file
            numel = 1
            for dim in shape:
                numel *= dim
            total += numel * (torch.empty((), dtype=dtype).element_size() if dtype is not None else 0)
    metadata = {"total_size": total}
    model_dtype = next((dt for dt, _ in headers.get(WEIGHTS_NAME, {}).values() if dt and dt.is_floating_point), None)
    if model_dtype is not None:
        metadata["dtype"] = str(model_dtype).removeprefix("torch.")
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def config_from_directory(directory: Path) -> BagelConfig:
    """`config.json`, or the released `llm_config.json` + `vit_config.json` when there is no
    config.json or when it is not a BAGEL one (e.g. a copy of the Qwen2 LLM config)."""
    file = directory / CONFIG_NAME
    if file.is_file():
        model_type = _json_file(file).get("model_type")
        if model_type not in (None, BagelConfig.model_type):
            if all((directory / name).is_file() for name in ("llm_config.json", "vit_config.json")):
                logger.info(
                    "%s describes a %r model; building the BAGEL config from llm_config.json + "
                    "vit_config.json instead.",
                    file,
                    model_type,
                )
                return BagelConfig.from_released_files(directory)
            raise ValueError(
                f"{file} is a {model_type!r} config, not a BAGEL one, and the directory has no llm_config.json + "
                "vit_config.json to build one from; pass config=BagelConfig(...) or fix config.json."
            )
    return BagelConfig.from_pretrained(directory)


def _json_file(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{file} is not a valid JSON file: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a JSON object.")
    return data


def loadable_directory(
    directory: Path, headers: dict[str, dict], config: BagelConfig | None
) -> tuple[Path, str | None]:
    """A directory transformers' `from_pretrained` can read, and the temporary directory to remove
    once the model is gone (None when `directory` itself is readable: a BAGEL config.json, and the
    index `build_index` makes of the weight files present)."""
    index = build_index(headers)
    config_file, index_file = directory / CONFIG_NAME, directory / INDEX_NAME
    if config_file.is_file() and index_file.is_file():
        if _json_file(config_file).get("model_type") == BagelConfig.model_type and _json_file(index_file) == index:
            return directory, None
    if config is None:
        config = config_from_directory(directory)
    shadow = tempfile.mkdtemp(prefix="bagel-load-")
    try:
        (Path(shadow) / CONFIG_NAME).write_text(config.to_json_string(use_diff=False), encoding="utf-8")
        _write_json(Path(shadow) / INDEX_NAME, index)
        for file in headers:  # links, not copies: nothing is read but what transformers reads
            os.symlink((directory / file).resolve(), Path(shadow) / file)
    except BaseException:
        shutil.rmtree(shadow, ignore_errors=True)
        raise
    return Path(shadow), shadow


# ---- from_pretrained ------------------------------------------------------------------------

#: Hub arguments: a Hub id is downloaded here (the weights the stage needs), so transformers then
#: reads a local directory.
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


def load_pretrained(load, name_or_path, model_args: tuple, *, stage, strict: bool, kwargs: dict):
    """`BagelForUnifiedMultimodal.from_pretrained`: resolve the directory, check its files, hand it
    to transformers' `from_pretrained` (`load`), then hold the result to BAGEL's strictness."""
    stage = None if stage is None else normalize_stage(stage)  # fail fast on an unknown stage
    check_bool("strict", strict)
    _check_devices(kwargs.get("device_map"))
    if name_or_path is None:
        raise ValueError("from_pretrained needs a checkpoint directory or Hub repository id.")
    output_loading_info = kwargs.pop("output_loading_info", False)
    ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
    subfolder = kwargs.pop("subfolder", "") or ""
    hub = {name: kwargs.pop(name, None) for name in _HUB_KWARGS}
    hub["token"] = hub["token"] if hub["token"] is not None else kwargs.pop("use_auth_token", None)
    kwargs.pop("code_revision", None)  # AutoModel's: which code to run, already chosen
    for name in ("dtype", "torch_dtype"):  # "torch.bfloat16", as str(torch.bfloat16) writes it
        if isinstance(kwargs.get(name), str):
            kwargs[name] = kwargs[name].removeprefix("torch.")
    directory = resolve_checkpoint_dir(name_or_path, subfolder, hub, stage)
    headers = weight_headers(directory)

    config = kwargs.pop("config", None)
    if isinstance(config, (str, os.PathLike)):
        config = BagelConfig.from_pretrained(config)
    elif config is not None:
        if getattr(config, "model_type", None) != BagelConfig.model_type:
            raise TypeError(f"config must be a BagelConfig or a path to one, got {type(config).__name__}.")
        config = copy.deepcopy(config)
    if config is not None and stage is not None:
        config.stage = stage
    elif stage is not None:
        kwargs["stage"] = stage  # a config override, applied by BagelConfig.from_pretrained
    kwargs["key_mapping"] = {**VAE_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
    if kwargs.get("quantization_config") is not None:
        kwargs["quantization_config"] = with_unquantized_defaults(kwargs["quantization_config"])

    source, temporary = loadable_directory(directory, headers, config)
    try:
        model, info = load(
            str(source), *model_args, config=config, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except BaseException:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    if temporary:  # disk-offloaded weights are read through its links until the model is gone
        weakref.finalize(model, shutil.rmtree, temporary, True)
    info = _check_loading_info(model, info, headers, directory, strict, ignore_mismatched_sizes)
    model.config._name_or_path = os.fspath(name_or_path)
    model._bagel_checkpoint_dir = directory
    model.processor = load_processor(directory, model.config)
    model.generation_config = load_generation_config(directory, model.config)
    return (model, info) if output_loading_info else model


def _check_devices(device_map) -> None:
    """A device_map that names CUDA on a machine without it fails here, by name, not inside torch."""
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    named = [str(p) for p in places if isinstance(p, (str, torch.device))]
    if any(p.startswith("cuda") for p in named) and not torch.cuda.is_available():
        build = (
            "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        )
        raise ValueError(
            f"device_map={device_map!r} names a CUDA device, but this torch ({torch.__version__}) is {build}: use "
            "device_map='cpu', or run on a machine with an NVIDIA GPU and torch's CUDA build."
        )


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_loading_info(
    model, info: dict, headers: dict, directory: Path, strict: bool, ignore_mismatched: bool
) -> dict:
    """Raise, naming the keys, where transformers would only warn: shapes that disagree with the
    config (unless `ignore_mismatched_sizes`), and with `strict` checkpoint tensors the model has no
    place for and model weights the checkpoint lacks (a missing ae.safetensors only warns: the VAE
    stays random, which `strict` refuses too). Returns the info with sorted lists, as transformers 4 did."""
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    mismatched = sorted((key, tuple(ckpt), tuple(want)) for key, ckpt, want in info["mismatched_keys"])
    if mismatched and not ignore_mismatched:
        source = (
            "the vae_config of config.json"
            if all(k.startswith("vae.") for k, _, _ in mismatched)
            else "config.json, or llm_config.json + vit_config.json"
        )
        lines = "\n".join(
            f"  {key}: checkpoint {list(ckpt)} vs model {list(want)}" for key, ckpt, want in mismatched[:20]
        )
        more = f"\n  ... ({len(mismatched) - 20} more)" if len(mismatched) > 20 else ""
        raise ValueError(
            f"The checkpoint in {directory} does not match the configuration: {len(mismatched)} tensor(s) have "
            f"another shape than the model built from the config expects:\n{lines}{more}\nUse the config that belongs "
            f"to these weights ({source}), or pass ignore_mismatched_sizes=True to re-initialise those tensors."
        )
    if unexpected and strict:
        raise ValueError(
            f"The checkpoint in {directory} has {len(unexpected)} tensor(s) the model built from its config has no "
            f"place for: {_format_keys(unexpected)}. The config does not describe these weights (e.g. more layers); "
            "fix the config, or pass strict=False to skip them."
        )
    random_vae = model.vae is not None and VAE_WEIGHTS_NAME not in headers
    lacking = [k for k in missing if not (random_vae and k.startswith("vae."))]
    if lacking and strict:
        gen_only = all(checkpoint_bucket(k) == "gen" for k in lacking)
        hint = (
            " These are the generation (GEN) weights: the checkpoint is understanding-only; load it with stage=1."
            if gen_only and model.config.stage == 2
            else ""
        )
        raise ValueError(
            f"{directory / WEIGHTS_NAME} lacks {len(lacking)} weight(s) the model needs: "
            f"{_format_keys(lacking)}.{hint} "
            "Check that the config matches the checkpoint, or pass strict=False to initialise them randomly."
        )
    if random_vae and strict:
        raise FileNotFoundError(
            f"{directory} has no {VAE_WEIGHTS_NAME}: a stage-2 model needs the FLUX autoencoder's weights to "
            f"encode and decode images (without them it generates noise). Put {VAE_WEIGHTS_NAME} from the BAGEL "
            "release in the directory, load with stage=1 for understanding only, or pass strict=False to keep a "
            "random VAE."
        )
    if random_vae:  # strict=False
        logger.warning(
            "%s has no %s: the VAE of this stage-2 model is randomly initialised, so encoding / decoding images "
            "gives noise. Put the FLUX autoencoder weights (ae.safetensors from the BAGEL release) in the "
            "checkpoint directory, or load with stage=1 for understanding only.",
            directory,
            VAE_WEIGHTS_NAME,
        )
    if missing:
        logger.warning("Initialised %d weight(s) missing from the checkpoint: %s", len(missing), _format_keys(missing))
    return {
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "mismatched_keys": mismatched,
        "error_msgs": list(info.get("error_msgs", [])),
    }


def load_processor(directory: Path, config: BagelConfig):
    """The BagelProcessor of a checkpoint directory that has tokenizer files, else None."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from .processing_bagel import BagelProcessor

    try:
        # config= spares AutoTokenizer a second read of config.json, which would need trust_remote_code.
        return BagelProcessor.from_pretrained(str(directory), config=config)
    except Exception as err:  # noqa: BLE001 - the model itself loaded; say why the processor did not
        logger.warning(
            "Loaded the model but not its processor from %s (%s: %s); pass processor=BagelProcessor.from_pretrained"
            "(...) to chat / generate_image / edit_image.",
            directory,
            type(err).__name__,
            err,
        )
        return None


def load_generation_config(directory: Path, config: BagelConfig):
    """The checkpoint's generation_config.json over BAGEL's sampling defaults (a file may set a few
    keys); without the file, the defaults alone, as before checkpoints had one."""
    from .generation_config_bagel import BagelGenerationConfig

    if (directory / GENERATION_CONFIG_NAME).is_file():
        return BagelGenerationConfig.from_pretrained(str(directory))
    return BagelGenerationConfig.from_model_config(config)


# ---- saving ---------------------------------------------------------------------------------


def _relative_imports(file: Path) -> list[str]:
    """Module names a remote-code file imports relatively (`from .x import ...`)."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.append(node.module.split(".")[0])
    return names


def remote_code_files(*search_dirs: str | os.PathLike | None) -> dict[str, Path]:
    """`{file name: source path}` of the remote-code modules: the entry files
    (`REMOTE_CODE_ENTRY_FILES`, processing_bagel.py only when found) and, transitively, every
    sibling module they import; each found in the first of `search_dirs` that has it."""
    dirs = [Path(d) for d in (Path(__file__).resolve().parent, *search_dirs) if d is not None]
    found: dict[str, Path] = {}
    pending = list(REMOTE_CODE_ENTRY_FILES)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        source = next((d / name for d in dirs if (d / name).is_file()), None)
        if source is None:
            if name != "processing_bagel.py":
                logger.warning(
                    "Remote-code module %s not found in %s; the saved directory will lack it.",
                    name,
                    ", ".join(map(str, dirs)),
                )
            continue
        found[name] = source
        pending += [f"{module}.py" for module in _relative_imports(source)]
    return found


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_bagel_pretrained(model, save_directory, is_main_process, state_dict, safe_serialization, push_to_hub) -> None:
    """`BagelForUnifiedMultimodal.save_pretrained` (see there for the files written)."""
    from safetensors.torch import save_file

    if push_to_hub:
        raise NotImplementedError(
            "push_to_hub is not supported by BAGEL's save_pretrained: save to a directory, then upload it with "
            "huggingface_hub.upload_folder(repo_id=..., folder_path=save_directory)."
        )
    if not safe_serialization:
        raise ValueError(
            "BAGEL checkpoints are safetensors only (ema.safetensors / ae.safetensors): use safe_serialization=True."
        )
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            "This model was quantized when loaded; the released layout holds unquantized weights. Save the model "
            "loaded without quantization_config, and quantize when loading it."
        )
    if not is_main_process:
        return
    directory = Path(save_directory)
    if directory.is_file():
        raise NotADirectoryError(f"save_directory {directory} is a file; pass a directory.")
    directory.mkdir(parents=True, exist_ok=True)

    state = model.state_dict() if state_dict is None else state_dict
    ema, vae, other = {}, {}, []
    for key, tensor in state.items():
        if key.startswith("model."):
            ema[key] = tensor
        elif key.startswith("vae."):
            vae[key[len("vae.") :]] = tensor
        else:
            other.append(key)
    if other:
        raise ValueError(
            f"state_dict keys outside model.* / vae.* cannot be saved in the BAGEL layout: {_format_keys(other)}."
        )
    if not ema:
        raise ValueError("state_dict has no model.* tensors to write to ema.safetensors.")

    def to_file(tensors: dict) -> dict:
        out = {}
        for key, tensor in tensors.items():
            if tensor.is_meta:
                raise ValueError(f"{key} is on the meta device (never loaded, or offloaded); it cannot be saved.")
            out[key] = tensor.detach().to("cpu").contiguous()
        return out

    sources = remote_code_files(getattr(model, "_bagel_checkpoint_dir", None), model.config._name_or_path or None)
    config = copy.deepcopy(model.config)
    auto_map = dict(AUTO_MAP)
    if "processing_bagel.py" not in sources:
        auto_map.pop("AutoProcessor")
    config.auto_map = auto_map
    config.architectures = [type(model).__name__]
    config.dtype = next((t.dtype for t in ema.values() if t.is_floating_point()), None)
    for sub in (config.text_config, config.vision_config):
        if sub is not None:
            sub.dtype = config.dtype
    config._name_or_path = ""
    (directory / CONFIG_NAME).write_text(config.to_json_string(use_diff=False), encoding="utf-8")
    for name, data in config.released_sidecar_configs().items():
        data.pop("_name_or_path", None)
        _write_json(directory / name, data)

    metadata = {"format": "pt"}
    save_file(to_file(BagelStateDictAdapter(config).to_hf(ema)), str(directory / WEIGHTS_NAME), metadata=metadata)
    if vae:
        save_file(to_file(vae), str(directory / VAE_WEIGHTS_NAME), metadata=metadata)
    elif (directory / VAE_WEIGHTS_NAME).is_file():  # a stale VAE of an earlier save would be indexed
        (directory / VAE_WEIGHTS_NAME).unlink()
    _write_json(directory / INDEX_NAME, build_index(weight_headers(directory)))
    for name, source in sources.items():
        target = directory / name
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    processor = getattr(model, "processor", None)
    if processor is not None:  # tokenizer files + processor_config.json, so the directory is complete
        processor.save_pretrained(str(directory))
    if getattr(model, "generation_config", None) is not None:  # the sampling defaults this checkpoint uses
        model.generation_config.save_pretrained(str(directory))
