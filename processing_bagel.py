"""Processor for BAGEL (ByteDance-Seed/Bagel): text tokenizer plus the VAE and ViT image transforms.

The image preprocessing follows the reference implementation:

* images are converted to RGB, alpha being flattened onto a white background;
* they are resized with the "max long edge / min short edge" rule, both sides made divisible by a stride
  (VAE: 1024 / 512 / 16, ViT: 980 / 224 / 14 for BAGEL-7B-MoT), with bicubic antialiased resampling (PIL);
  the strides and the largest sides follow from the model's `BagelConfig` (`ImageSettings`), the smallest
  sides and the pixel budget are the processor's own settings (saved in ``processor_config.json``);
* they become float32 tensors in [-1, 1] (``ToTensor`` followed by ``Normalize(0.5, 0.5)``);
* for the ViT, the (3, H, W) tensor is cut into flattened patches with NaViT-style position ids.

This module depends only on torch, PIL and transformers (no torchvision) and, relatively, on
``configuration_bagel`` (the geometry), ``validation_bagel`` (the argument checks) and ``imports_bagel`` (quiet
imports), so it loads with ``AutoProcessor.from_pretrained(..., trust_remote_code=True)`` from a Hub repository.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .configuration_bagel import BagelConfig
from .imports_bagel import quiet_third_party_imports
from .validation_bagel import check_int, check_tensor

# isort: split
# Not used here: transformers before 5.15 copies a local directory's remote code one relative import
# deep, and configuration_bagel imports this module (see modeling_bagel.py).
from .state_dict_adapter import checkpoint_bucket  # noqa: F401

with quiet_third_party_imports():  # transformers imports torchao where installed
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.processing_utils import ProcessorMixin
    from transformers.utils import logging


logger = logging.get_logger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------------------

#: Smallest accepted input side, in pixels (both width and height must be at least this).
MIN_IMAGE_SIDE = 16
#: Largest accepted input area, in pixels (64 megapixels, e.g. 8000 x 8000).
MAX_IMAGE_PIXELS = 64_000_000
#: Pixel budget of the reference ``ImageTransform`` (its default ``max_pixels``, 14 * 14 * 9 * 1024).
DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024

#: The reference's smallest sides of its inference transforms (the largest sides and the strides come from the
#: model config, see `ImageSettings`).
VAE_MIN_SIZE, VIT_MIN_SIZE = 512, 224
#: What `ImageSettings` takes from the config: processor_config.json files written before it did hold them.
CONFIG_GEOMETRY = ("vae_stride", "vit_stride", "vit_patch_size", "vit_max_num_patch_per_side")

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
START_OF_IMAGE_TOKEN = "<|vision_start|>"
END_OF_IMAGE_TOKEN = "<|vision_end|>"
BAGEL_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, START_OF_IMAGE_TOKEN, END_OF_IMAGE_TOKEN)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# --------------------------------------------------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------------------------------------------------


def _require_pil(image: Any, name: str = "image") -> Image.Image:
    if not isinstance(image, Image.Image):
        kind = type(image)
        raise TypeError(
            f"{name} must be a PIL.Image.Image, got {kind.__module__}.{kind.__qualname__}; "
            "open files with PIL.Image.open(path) and convert arrays with PIL.Image.fromarray(array)."
        )
    return image


def check_image_size(image: Image.Image) -> None:
    """Raise ``ValueError`` unless ``image`` (PIL, size W x H) has both sides >= ``MIN_IMAGE_SIDE`` and at most
    ``MAX_IMAGE_PIXELS`` pixels."""
    width, height = _require_pil(image).size
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image size {width}x{height} (width x height, {width * height} pixels) is out of range: both sides "
            f"must be at least {MIN_IMAGE_SIDE} pixels and the area at most {MAX_IMAGE_PIXELS} pixels "
            f"({MAX_IMAGE_PIXELS / 1e6:g} megapixels)."
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to mode ``RGB`` (same W x H).

    Images with an alpha band (RGBA, LA, PA, ...) or palette/other images with a ``transparency`` entry are
    composited onto a white background by their alpha, as the reference ``pil_img2rgb`` does for RGBA. (The
    reference drops the alpha of LA images instead of flattening it; here every alpha is flattened onto white.)

    Raises:
        TypeError: ``image`` is not a ``PIL.Image.Image``.
    """
    image = _require_pil(image)
    if image.mode.startswith(("I", "F")):
        image = _to_8bit(image)
    if image.mode in _ALPHA_MODES or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit (``I;16*``), 32-bit integer (``I``) or float (``F``) grayscale image as 8-bit ``L``, scaled
    into 0..255. PIL's own conversion clips instead, so such images came out almost all white or black.

    ``I;16*`` and ``I`` span 0..65535 (PIL opens 16-bit PNG and TIFF files as either); ``F`` spans 0..1,
    or 0..255 when its values exceed 1. Values outside those ranges raise a ``ValueError``.
    """
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        full_scale = 1.0 if high <= 1.0 else 255.0
    else:
        full_scale = 65535.0
    if low < 0 or high > full_scale or not np.isfinite(values).all():
        raise ValueError(
            f"a mode {image.mode!r} image with values in [{low:g}, {high:g}]: expected 0..{full_scale:g}"
            f"{' (or 0..1)' if image.mode == 'F' else ''}; scale it to 8 bits yourself and pass "
            "PIL.Image.fromarray(array_uint8)."
        )
    return Image.fromarray(np.rint(values * (255.0 / full_scale)).astype(np.uint8))


def _make_divisible(value: float, stride: int) -> int:
    """Nearest multiple of ``stride`` (Python's round-half-to-even), at least ``stride``."""
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    new_width = _make_divisible(round(width * scale), stride)
    new_height = _make_divisible(round(height * scale), stride)
    return new_width, new_height


def get_resize_size(
    width: int,
    height: int,
    max_size: int,
    min_size: int,
    stride: int,
    max_pixels: float = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target ``(new_width, new_height)`` of the reference ``MaxLongEdgeMinShortEdgeResize`` rule.

    1. ``scale = min(max_size / long_side, 1)``, then ``scale = max(scale, min_size / short_side)``;
       each side becomes ``round(side * scale)`` snapped to a multiple of ``stride`` (at least ``stride``).
    2. If ``new_width * new_height > max_pixels``: rescale those sides by ``max_pixels / (new_width * new_height)``
       (the reference applies this area ratio as a linear factor) and snap again.
    3. If the long side still exceeds ``max_size``: rescale by ``max_size / long_side`` and snap again.

    Python's ``round`` (half to even) is used throughout, as in the reference.
    """
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    new_width, new_height = _apply_scale(width, height, scale, stride)
    if new_width * new_height > max_pixels:
        scale = max_pixels / (new_width * new_height)
        new_width, new_height = _apply_scale(new_width, new_height, scale, stride)
    if max(new_width, new_height) > max_size:
        scale = max_size / max(new_width, new_height)
        new_width, new_height = _apply_scale(new_width, new_height, scale, stride)
    return new_width, new_height


def resize_image(
    image: Image.Image,
    max_size: int,
    min_size: int,
    stride: int,
    max_pixels: float = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Resize a PIL image (W x H) to ``get_resize_size(W, H, ...)`` with bicubic resampling.

    PIL's ``resize`` is antialiased, which is what ``torchvision.transforms.functional.resize(pil_image, ...,
    BICUBIC, antialias=True)`` calls in the reference. An image already at the target size is returned as a copy.

    Raises:
        TypeError: ``image`` is not a PIL image.
        ValueError: the image is smaller than ``MIN_IMAGE_SIDE`` on a side or larger than ``MAX_IMAGE_PIXELS``.
    """
    check_image_size(image)
    width, height = image.size
    new_size = get_resize_size(width, height, max_size, min_size, stride, max_pixels)
    if new_size == (width, height):
        return image.copy()
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (W x H, converted to RGB if needed) -> float32 tensor of shape (3, H, W) in [-1, 1].

    Same arithmetic as ``ToTensor()`` then ``Normalize(mean=0.5, std=0.5)``: ``(x / 255 - 0.5) / 0.5``.
    """
    image = _require_pil(image)
    if image.mode != "RGB":
        image = to_rgb(image)
    width, height = image.size
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    tensor = data.view(height, width, 3).permute(2, 0, 1).contiguous()
    tensor = tensor.to(torch.float32).div(255)
    return tensor.sub_(0.5).div_(0.5)


def tensor_to_image(x: torch.Tensor, round_values: bool = True) -> Image.Image:
    """Tensor of shape (3, H, W) or (1, 3, H, W) with values in [-1, 1] -> PIL RGB image (W x H).

    Values map to ``clamp((x + 1) / 2, 0, 1) * 255``, rounded to the nearest integer. With
    ``round_values=False`` they are truncated instead, as the reference decoder does (``.to(torch.uint8)``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__module__}.{type(x).__qualname__}.")
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a tensor of shape (3, H, W) or (1, 3, H, W), got {tuple(x.shape)}.")
    x = (x.detach().to("cpu", torch.float32) * 0.5 + 0.5).clamp(0, 1) * 255
    if round_values:
        x = x.round()
    data = x.permute(1, 2, 0).to(torch.uint8).contiguous()
    height, width = data.shape[:2]
    return Image.frombytes("RGB", (width, height), bytes(data.numpy().tobytes()))


def latent_position_ids(h: int, w: int, max_latent_size: int, device=None) -> torch.Tensor:
    """Row-major ids into the latent position table for an h x w token grid."""
    rows = torch.arange(h, device=device)[:, None] * max_latent_size
    return (rows + torch.arange(w, device=device)[None, :]).reshape(-1)


def patchify_vit(
    pixels: torch.Tensor, patch_size: int, max_num_patch_per_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a (3, H, W) tensor into ViT patches.

    Returns:
        patches: (N, 3 * P * P) with N = (H / P) * (W / P), patches in (row, col) raster order, each flattened in
            (py, px, channel) order, i.e. ``patches[r * (W / P) + c, (py * P + px) * 3 + ch] ==
            pixels[ch, r * P + py, c * P + px]``.
        position_ids: (N,) int64, ``row * max_num_patch_per_side + col``.

    Raises:
        TypeError: ``pixels`` is not a tensor.
        ValueError: it is not (C, H, W), H or W is not a multiple of ``patch_size``, or the grid has
            more than ``max_num_patch_per_side`` patches on a side.
    """
    check_tensor("pixels", pixels, dims=3, fix="A (C, H, W) image tensor: BagelProcessor.vit_transform(image).")
    p = patch_size
    channels, height, width = pixels.shape
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} (H x W) is not a multiple of the patch size {p}.")
    rows, cols = height // p, width // p
    if rows > max_num_patch_per_side or cols > max_num_patch_per_side:
        raise ValueError(
            f"patch grid {rows}x{cols} (rows x cols) exceeds max_num_patch_per_side={max_num_patch_per_side}."
        )
    patches = pixels.reshape(channels, rows, p, cols, p).permute(1, 3, 2, 4, 0).reshape(rows * cols, p * p * channels)
    row_ids = torch.arange(rows, device=pixels.device)
    col_ids = torch.arange(cols, device=pixels.device)
    position_ids = (row_ids[:, None] * max_num_patch_per_side + col_ids[None, :]).flatten()
    return patches, position_ids


@dataclass(frozen=True)
class ImageSettings:
    """The processor's resize rules (pixels). `from_config` takes the strides, the patch grid and the default largest
    sides from a `BagelConfig`; the smallest sides and the pixel budget are the processor's own."""

    vae_max_size: int
    vae_min_size: int
    vae_stride: int
    vit_max_size: int
    vit_min_size: int
    vit_stride: int
    vit_patch_size: int
    vit_max_num_patch_per_side: int
    max_pixels: int

    @classmethod
    def from_config(
        cls,
        config: BagelConfig | None = None,
        vae_max_size: int | None = None,
        vae_min_size: int = VAE_MIN_SIZE,
        vit_max_size: int | None = None,
        vit_min_size: int = VIT_MIN_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> ImageSettings:
        """Rules for the model of `config` (default: BAGEL-7B-MoT's, `BagelConfig()`). `vae_max_size` /
        `vit_max_size` default to the largest side the config's position tables cover (1024 / 980)."""
        config = BagelConfig() if config is None else config
        needs = (
            "vit_patch_size",
            "vit_max_num_patch_per_side",
            "vae_token_stride",
            "max_vae_image_size",
            "max_vit_image_size",
        )
        if not all(hasattr(config, name) for name in needs):
            raise TypeError(
                f"config must be the model's BagelConfig (e.g. model.config or BagelConfig.from_pretrained(path)), "
                f"got {type(config).__name__}."
            )
        return cls(
            vae_max_size=check_int(
                "vae_max_size", config.max_vae_image_size if vae_max_size is None else vae_max_size, minimum=1
            ),
            vae_min_size=check_int("vae_min_size", vae_min_size, minimum=1),
            vae_stride=config.vae_token_stride,
            vit_max_size=check_int(
                "vit_max_size", config.max_vit_image_size if vit_max_size is None else vit_max_size, minimum=1
            ),
            vit_min_size=check_int("vit_min_size", vit_min_size, minimum=1),
            vit_stride=config.vit_patch_size,  # the ViT cuts resized images into whole patches
            vit_patch_size=config.vit_patch_size,
            vit_max_num_patch_per_side=config.vit_max_num_patch_per_side,
            max_pixels=check_int("max_pixels", max_pixels, minimum=1),
        )

    def check_geometry(self, values: dict[str, Any]) -> None:
        """Raise unless `values` (CONFIG_GEOMETRY names, None for not given) agree with these rules: they come from
        the model config, which is their one home."""
        for name, value in values.items():
            if value is None:
                continue
            value = check_int(name, value, minimum=1)
            if value != getattr(self, name):
                raise ValueError(
                    f"{name}={value} disagrees with the model config, which gives {getattr(self, name)}: the processor "
                    f"takes {name} from the BagelConfig. Pass config= (e.g. BagelConfig(vit_patch_size=...)) instead, "
                    f"or delete {name!r} from processor_config.json."
                )


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer helper
# --------------------------------------------------------------------------------------------------------------------


def add_bagel_special_tokens(tokenizer) -> tuple[Any, dict[str, int], int]:
    """Add the four BAGEL tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``) to
    ``tokenizer`` when it does not know them, as the reference ``add_special_tokens`` does.

    Returns:
        ``(tokenizer, ids, num_new_tokens)`` with ``ids`` = ``{"bos_token_id", "eos_token_id", "start_of_image",
        "end_of_image"}`` (the reference's keys). The tokenizer is modified in place.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in BAGEL_SPECIAL_TOKENS if token not in vocab]
    num_new_tokens = tokenizer.add_tokens(missing) if missing else 0
    ids = dict(
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        start_of_image=tokenizer.convert_tokens_to_ids(START_OF_IMAGE_TOKEN),
        end_of_image=tokenizer.convert_tokens_to_ids(END_OF_IMAGE_TOKEN),
    )
    return tokenizer, ids, num_new_tokens


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------

#: `from_pretrained` arguments that locate files on the Hub, passed on when the processor reads the config there.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _directory_config(path: str | os.PathLike, kwargs: dict[str, Any]) -> BagelConfig | None:
    """The BagelConfig of a checkpoint directory or Hub repository; None where it has none (then the processor
    takes BAGEL-7B-MoT's geometry, as before the processor read configs)."""
    local = Path(path)
    if local.is_dir():
        if not any((local / name).is_file() for name in ("config.json", "llm_config.json")):
            return None
        return BagelConfig.from_pretrained(local)
    try:
        return BagelConfig.from_pretrained(path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    except OSError:  # a Hub repository without config.json (the released layout has none)
        return None


class BagelProcessor(ProcessorMixin):
    """Tokenizer plus BAGEL's image transforms.

    The tokenizer (a Qwen2 tokenizer) is the only sub-processor; the image transforms are methods whose rules
    (`ImageSettings`) come from the model's `BagelConfig` (strides, patch grid, largest sides) and from the keyword
    arguments below, which ``processor_config.json`` saves where they differ from what the config gives. The four
    BAGEL special tokens are added to the tokenizer when it lacks them (as the reference does when it loads a
    tokenizer).

    Args:
        tokenizer: a ``PreTrainedTokenizerBase`` (Qwen2).
        chat_template: optional chat template.
        config: the model's ``BagelConfig`` (default: BAGEL-7B-MoT's); ``from_pretrained`` reads the directory's.
        vae_max_size, vae_min_size: longest / shortest side of the VAE (generation / editing) input (default
            longest: what the config's latent grid covers, 1024 for BAGEL-7B-MoT).
        vit_max_size, vit_min_size: the same for the ViT (understanding) input (default longest: the config's ViT
            grid, 980).
        max_pixels: pixel budget of the resize rule (reference default 14 * 14 * 9 * 1024; never reached with the
            default sizes).
        vae_stride, vit_stride, vit_patch_size, vit_max_num_patch_per_side: the config's; accepted only to read
            processor_config.json files that hold them, and then they must agree with the config.
    """

    # Every argument must stay positional-or-keyword: `from_args_and_dict` only forwards those.
    def __init__(
        self,
        tokenizer,
        chat_template=None,
        config=None,
        vae_max_size: int | None = None,
        vae_min_size: int = VAE_MIN_SIZE,
        vit_max_size: int | None = None,
        vit_min_size: int = VIT_MIN_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        vae_stride: int | None = None,
        vit_stride: int | None = None,
        vit_patch_size: int | None = None,
        vit_max_num_patch_per_side: int | None = None,
    ):
        config = BagelConfig() if config is None else config
        settings = ImageSettings.from_config(config, vae_max_size, vae_min_size, vit_max_size, vit_min_size, max_pixels)
        settings.check_geometry(
            dict(
                vae_stride=vae_stride,
                vit_stride=vit_stride,
                vit_patch_size=vit_patch_size,
                vit_max_num_patch_per_side=vit_max_num_patch_per_side,
            )
        )
        self.image_settings = settings
        self._config_sides = dict(vae_max_size=config.max_vae_image_size, vit_max_size=config.max_vit_image_size)
        # The rules as attributes, as the rest of the code and processor_config.json name them.
        for name, value in vars(settings).items():
            setattr(self, name, value)
        super().__init__(tokenizer, chat_template=chat_template)
        _, _, num_new = add_bagel_special_tokens(self.tokenizer)
        if num_new:
            logger.warning(
                f"Added {num_new} BAGEL special token(s) to the tokenizer; its length is now {len(tokenizer)}."
            )

    # ---- serialization -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> BagelProcessor:
        """As transformers' (``AutoProcessor`` calls it), with the directory's ``BagelConfig`` (config.json, or the
        released llm_config.json + vit_config.json) as ``config`` unless one is given; without either, BAGEL-7B-MoT's
        geometry applies."""
        if kwargs.get("config") is None:
            kwargs["config"] = _directory_config(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("config", None)
        # What the config gives is not saved: the config is its one home, so the two cannot disagree.
        for name in CONFIG_GEOMETRY:
            output.pop(name, None)
        for name, side in self._config_sides.items():
            if output.get(name) == side:
                output.pop(name)
        auto_map = dict(output.get("auto_map") or {})
        auto_map.setdefault("AutoProcessor", f"processing_bagel.{self.__class__.__name__}")
        output["auto_map"] = auto_map
        return output

    # ---- images --------------------------------------------------------------------------------------------------

    def vae_resize(self, image: Image.Image, max_size: int | None = None) -> Image.Image:
        """PIL image -> RGB PIL image resized by the VAE rule (sides multiples of ``vae_stride``);
        `max_size` (default ``vae_max_size``) caps the longer side, e.g. at what a checkpoint
        generates."""
        check_image_size(image)  # before converting, so oversized images fail cheaply
        min_size = self.vae_min_size if max_size is None else min(self.vae_min_size, max_size)
        max_size = self.vae_max_size if max_size is None else max_size
        return resize_image(to_rgb(image), max_size, min_size, self.vae_stride, self.max_pixels)

    def vae_transform(self, image: Image.Image, max_size: int | None = None) -> torch.Tensor:
        """PIL image -> (3, H, W) float32 in [-1, 1], H and W multiples of ``vae_stride`` (VAE
        input); `max_size` as in ``vae_resize``."""
        return image_to_tensor(self.vae_resize(image, max_size))

    def vit_transform(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, H, W) float32 in [-1, 1], H and W multiples of ``vit_stride`` (ViT input)."""
        check_image_size(image)  # before converting, so oversized images fail cheaply
        image = resize_image(to_rgb(image), self.vit_max_size, self.vit_min_size, self.vit_stride, self.max_pixels)
        return image_to_tensor(image)

    def vit_patches(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL image -> ``(patches (N, 3 * P * P), position_ids (N,))`` for the ViT (see ``patchify_vit``)."""
        return patchify_vit(self.vit_transform(image), self.vit_patch_size, self.vit_max_num_patch_per_side)

    # ---- both --------------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, audio=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """Text and images as BAGEL's packed training forward takes them (the high-level API,
        `model.chat` / `generate_image` / `edit_image`, needs none of this: it takes PIL images and
        strings).

        `text` (a str or a list of str) -> ``input_ids``: one list of ids per text, without special
        tokens (a text split is ``[bos] ids [eos]``, docs/training.md, "Training inputs"). `images` (a PIL image
        or a list) -> ``packed_vit_tokens`` (V, 3 * P * P), ``packed_vit_position_ids`` (V,) and
        ``vit_token_seqlens`` (images,): every image through ``vit_patches``, packed back to back.
        Keyword arguments are not taken (the resize rules are the processor's own settings)."""
        if videos is not None or audio is not None:
            raise ValueError("BAGEL takes text and images only: videos= and audio= are not supported.")
        if kwargs:
            raise TypeError(
                f"BagelProcessor() got unexpected keyword argument(s) {sorted(kwargs)}; it takes images= and text= "
                "(the resize rules are the processor's settings, e.g. BagelProcessor(tokenizer, vit_max_size=...))."
            )
        if return_tensors not in ("pt", None):
            raise ValueError(
                f"return_tensors must be 'pt' (or None), got {return_tensors!r}: BAGEL works on torch tensors."
            )
        if images is None and text is None:
            raise ValueError("Give text=, images= or both.")
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
                raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}.")
            data["input_ids"] = [self.encode_text(t) for t in texts]
        if images is not None:
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            if not images:
                raise ValueError("images is an empty list: give at least one PIL image, or leave images out.")
            patches = [self.vit_patches(_require_pil(image, f"images[{i}]")) for i, image in enumerate(images)]
            data["packed_vit_tokens"] = torch.cat([p for p, _ in patches])
            data["packed_vit_position_ids"] = torch.cat([ids for _, ids in patches])
            data["vit_token_seqlens"] = torch.tensor([p.shape[0] for p, _ in patches], dtype=torch.long)
        return BatchFeature(data)

    # ---- text ----------------------------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__module__}.{type(text).__qualname__}.")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int] | torch.Tensor, **kwargs) -> str:
        """Text of ``ids`` (keyword arguments go to the tokenizer's ``decode``, e.g. ``skip_special_tokens``)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), **kwargs)

    @property
    def bos_token_id(self) -> int:
        """Id of ``<|im_start|>``."""
        return self.tokenizer.convert_tokens_to_ids(BOS_TOKEN)

    @property
    def eos_token_id(self) -> int:
        """Id of ``<|im_end|>``."""
        return self.tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    @property
    def start_of_image_id(self) -> int:
        """Id of ``<|vision_start|>``."""
        return self.tokenizer.convert_tokens_to_ids(START_OF_IMAGE_TOKEN)

    @property
    def end_of_image_id(self) -> int:
        """Id of ``<|vision_end|>``."""
        return self.tokenizer.convert_tokens_to_ids(END_OF_IMAGE_TOKEN)

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The four ids under the reference's names (``bos_token_id``, ``eos_token_id``, ``start_of_image``,
        ``end_of_image``)."""
        return dict(
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            start_of_image=self.start_of_image_id,
            end_of_image=self.end_of_image_id,
        )


__all__ = [
    "BagelProcessor",
    "add_bagel_special_tokens",
    "check_image_size",
    "get_resize_size",
    "image_to_tensor",
    "patchify_vit",
    "resize_image",
    "tensor_to_image",
    "to_rgb",
]
