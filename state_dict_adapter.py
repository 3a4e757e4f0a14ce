"""Map BAGEL's released checkpoint (``ema.safetensors``) onto our native layout and back.

The checkpoint's keys (``language_model.*``, ``vit_model.*``, ``connector.*``, ...) are those of
``BagelModel``; ``BagelForUnifiedMultimodal`` holds it as ``self.model``, so our native keys are the
same names rooted under ``model.``. Each checkpoint key falls in one bucket:

* ``shared``: read by both paths and loaded at every stage (embeddings, LM head, final norm);
* ``und``:    the understanding path (decoder weights without ``_moe_gen``, ViT, connector);
* ``gen``:    the generation path (every ``*_moe_gen`` weight, time embedder, VAE projections);
* ``vae``:    the VAE (``ae.safetensors``: ``encoder.*`` / ``decoder.*``), recognised and dropped;
* ``unknown``: anything else.

Stage 1 (understanding) keeps ``und`` + ``shared``; stage 2 (generation) also keeps ``gen``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

ROOT = "model."
_LAYER = r"^language_model\.model\.layers\.\d+\."

SHARED_PATTERNS = [
    r"^language_model\.model\.embed_tokens\.weight$",
    r"^language_model\.lm_head\.weight$",
    r"^language_model\.model\.norm\.weight$",
]
GEN_PATTERNS = [
    _LAYER + r"self_attn\.[qkvo]_proj_moe_gen\.(weight|bias)$",
    _LAYER + r"self_attn\.[qk]_norm_moe_gen\.weight$",
    _LAYER + r"mlp_moe_gen\.(gate|up|down)_proj\.weight$",
    _LAYER + r"(input|post_attention)_layernorm_moe_gen\.weight$",
    r"^language_model\.model\.norm_moe_gen\.weight$",
    r"^time_embedder\.mlp\.[02]\.(weight|bias)$",
    r"^(vae2llm|llm2vae)\.(weight|bias)$",
    r"^latent_pos_embed\.pos_embed$",
]
UND_PATTERNS = [
    _LAYER + r"self_attn\.[qkvo]_proj\.(weight|bias)$",
    _LAYER + r"self_attn\.[qk]_norm\.weight$",
    _LAYER + r"mlp\.(gate|up|down)_proj\.weight$",
    _LAYER + r"(input|post_attention)_layernorm\.weight$",
    r"^vit_model\.vision_model\.",
    r"^connector\.fc[12]\.(weight|bias)$",
    r"^vit_pos_embed\.pos_embed$",
]
VAE_PATTERNS = [r"^encoder\.", r"^decoder\."]

# Checked in this order; the first bucket whose pattern matches wins.
_BUCKETS = [
    (name, [re.compile(p) for p in patterns])
    for name, patterns in (
        ("shared", SHARED_PATTERNS),
        ("gen", GEN_PATTERNS),
        ("und", UND_PATTERNS),
        ("vae", VAE_PATTERNS),
    )
]
_STAGES = {"1": 1, "2": 2, "stage1": 1, "stage2": 2}
_KEEP = {1: ("shared", "und"), 2: ("shared", "und", "gen")}


def _strip_root(key: str) -> str:
    return key[len(ROOT) :] if key.startswith(ROOT) else key


def checkpoint_bucket(key: str) -> str:
    """The bucket of one checkpoint key (``model.`` root optional)."""
    key = _strip_root(key)
    for name, patterns in _BUCKETS:
        if any(p.match(key) for p in patterns):
            return name
    return "unknown"


def _partition(state_dict: dict) -> dict[str, dict]:
    """Split a state dict into the buckets ``und``, ``gen``, ``shared``, ``vae`` and ``unknown``."""
    parts: dict[str, dict] = {name: {} for name in ("und", "gen", "shared", "vae", "unknown")}
    for key, value in state_dict.items():
        parts[checkpoint_bucket(key)][key] = value
    return parts


def _normalize_stage(stage) -> int:
    """1, 2, "1", "2", "stage1" or "stage2" (any case) -> 1 or 2; anything else -> ValueError."""
    if isinstance(stage, int) and not isinstance(stage, bool):
        stage = str(stage)
    if isinstance(stage, str) and stage.strip().lower() in _STAGES:
        return _STAGES[stage.strip().lower()]
    raise ValueError(f"Unknown BAGEL stage {stage!r}: use 1 / 'stage1' (understanding only) or 2 / 'stage2' (joint).")


class BagelStateDictAdapter:
    """Converts between checkpoint keys (``ema.safetensors``) and our ``model.``-rooted keys."""

    def __init__(self, config=None, *, stage=2):
        self.config = config
        self.stage = _normalize_stage(stage)

    def select_keys(self, keys, *, stage=None, strict: bool = True) -> list[str]:
        """The checkpoint keys a stage keeps, in input order; VAE keys drop, unknown ones raise or drop."""
        stage = self.stage if stage is None else _normalize_stage(stage)
        classified = [(key, checkpoint_bucket(key)) for key in keys]
        buckets: dict[str, list[str]] = {}
        for key, name in classified:
            buckets.setdefault(name, []).append(key)
        unknown = buckets.get("unknown", [])
        if unknown:
            shown = ", ".join(unknown[:10])
            if len(unknown) > 10:
                shown += f", ... ({len(unknown) - 10} more)"
            if strict:
                raise KeyError(
                    f"{len(unknown)} unrecognised BAGEL checkpoint key(s): {shown}; pass strict=False to drop them"
                )
            logger.warning("dropping %d unrecognised BAGEL checkpoint key(s): %s", len(unknown), shown)
        if buckets.get("vae"):
            logger.info("dropping %d VAE key(s); the VAE loads from ae.safetensors", len(buckets["vae"]))
        if stage == 1 and buckets.get("gen"):
            logger.info("stage 1: skipping %d generation key(s)", len(buckets["gen"]))
        return [key for key, name in classified if name in _KEEP[stage]]  # input order kept

    def from_hf(self, hf_state_dict: dict, *, stage=None, strict: bool = True) -> dict:
        """Checkpoint state dict -> native (``model.``-rooted) state dict for the given stage."""
        kept = self.select_keys(hf_state_dict.keys(), stage=stage, strict=strict)
        return {ROOT + _strip_root(key): hf_state_dict[key] for key in kept}

    def to_hf(self, state_dict: dict) -> dict:
        """Native state dict -> checkpoint keys (strips the ``model.`` root; drops nothing)."""
        out = {}
        for fqn, tensor in state_dict.items():
            out.update(self.convert_single_tensor_to_hf(fqn, tensor))
        return out

    def convert_single_tensor_to_hf(self, fqn: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """One native tensor -> ``[(checkpoint_key, tensor)]``; KeyError if not under ``model.``."""
        if not fqn.startswith(ROOT):
            raise KeyError(f"{fqn!r} is not a BAGEL model key (expected it under {ROOT!r})")
        return [(fqn[len(ROOT) :], tensor)]


class SafetensorsReader:
    """Tensors of safetensors files by native name, read one at a time (memory-mapped), never the
    whole file. `files` maps a native prefix to the file holding that prefix's tensors without it,
    e.g. `{"model.": ".../ema.safetensors", "vae.": ".../ae.safetensors"}`. A context manager:
    the files stay open until it exits."""

    def __init__(self, files: dict[str, str | os.PathLike]):
        self._stack = contextlib.ExitStack()
        self._files, self._handles, self._keys = {}, {}, {}
        for prefix, path in files.items():
            path = os.fspath(path)
            try:
                handle = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
                keys = set(handle.keys())
            except Exception as err:  # SafetensorError: bad or truncated header, a pickle, an empty file
                self.close()
                raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
            self._files[prefix], self._handles[prefix], self._keys[prefix] = path, handle, keys

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _stored(self, name: str) -> tuple[str, str] | None:
        for prefix, keys in self._keys.items():
            if name.startswith(prefix) and name[len(prefix) :] in keys:
                return prefix, name[len(prefix) :]
        return None

    def keys(self) -> list[str]:
        """Every native name the files hold."""
        return [prefix + key for prefix, keys in self._keys.items() for key in sorted(keys)]

    def __contains__(self, name: str) -> bool:
        return self._stored(name) is not None

    def read(self, name: str) -> torch.Tensor:
        """One tensor, from disk now."""
        stored = self._stored(name)
        if stored is None:
            raise KeyError(f"{name!r} is in none of {list(self._files.values())}")
        prefix, key = stored
        try:
            return self._handles[prefix].get_tensor(key)
        except Exception as err:
            raise ValueError(f"{self._files[prefix]} is not a readable safetensors file: {err}") from err


def load_bagel_checkpoint_state_dict(checkpoint_dir, *, stage=2, strict: bool = True, config=None) -> dict:
    """Read ``<checkpoint_dir>/ema.safetensors`` and return the native state dict for ``stage``.

    Only the tensors the stage keeps are read from disk (stage 1 never reads generation weights).
    """
    path = os.path.join(os.fspath(checkpoint_dir), "ema.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"BAGEL checkpoint weights not found at {path}; the directory should hold ema.safetensors "
            "(model weights) and ae.safetensors (VAE), as in the released BAGEL checkpoint"
        )
    adapter = BagelStateDictAdapter(config, stage=stage)
    with SafetensorsReader({ROOT: path}) as reader:
        kept = adapter.select_keys([name[len(ROOT) :] for name in reader.keys()], strict=strict)  # the file's keys
        return {ROOT + _strip_root(key): reader.read(ROOT + key) for key in kept}
