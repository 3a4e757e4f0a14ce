"""Training data for BAGEL: sample plans, their packing into the training forward's batch, and the
clean-image VAE encoding of a pack.

A *plan* is what the reference data pipeline (ByteDance-Seed/Bagel, `PackedDataset.pack_sequence`)
packs: an ordered list of `PlanItem`s, each a text, a ViT image or a VAE image with its flags.
`PlanBuilder` turns user samples (text-to-image, editing, understanding, interleaved) into plans;
`PackBuilder` / `pack_samples` lay plans out as one packed sequence (the keyword arguments of
`BagelForUnifiedMultimodal.forward`, with `padded_images` in place of `padded_latent`); `Packer`
groups a stream of plans into packs of about `expected_num_tokens`; `encode_pack` moves a pack to
the GPU and encodes its images with the model's VAE.

Packing rules (the reference's, see the spec's section 8): `curr` is the running index in the pack
and `rope` restarts at 0 for each sample.
* text `t1..tn`: `[bos, t1..tn, eos]`, one `causal` split, rope positions `rope..rope+n+1`. With
  loss: CE at `[bos, t1..tn]` with labels `[t1..tn, eos]`, weight `len2weight(n + 1)`.
* ViT image: `[start] patches [end]`, one `full` split, all at `rope`; rope += 1.
* VAE image: `[start] h*w latent tokens [end]`, all at `rope`. With loss: `noise` split, MSE on its
  tokens, one raw timestep ~ N(0, 1) for the image (the forward applies sigmoid and shift), rope not
  advanced. Without: `full` split, timestep -inf (clean), rope += 1.
* items with `enable_cfg` are dropped with the config's probability (text: nothing is packed;
  images: nothing is packed but rope still advances by one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..processing_bagel import (
    DEFAULT_MAX_PIXELS,
    ImageSettings,
    image_to_tensor,
    latent_position_ids,
    patchify_vit,
    resize_image,
    to_rgb,
)
from ..validation_bagel import check_int, check_number

logger = logging.getLogger(__name__)

TEXT, VIT_IMAGE, VAE_IMAGE = "text", "vit_image", "vae_image"
ITEM_KINDS = (TEXT, VIT_IMAGE, VAE_IMAGE)
LOSS_REDUCTIONS = ("square", "token", "sample")
DROPOUT_NAMES = ("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob")
IMAGE_PLACEHOLDER = "<image>"


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


@dataclass
class PlanItem:
    """One item of a sample plan.

    Args:
        kind: "text", "vit_image" or "vae_image".
        data: token ids (text, without bos/eos) or a (3, H, W) float image in [-1, 1] (images,
            already resized: H, W multiples of the ViT patch or of the VAE's 16-pixel token).
        loss: text: CE on its tokens; VAE image: it is the noised image to generate (MSE).
        enable_cfg: the item may be dropped for classifier-free guidance.
        special_token_label: when set, a CE target (weight 1) at the item's closing token (text:
            `eos`, images: `end`), as the reference's `special_token_loss`.
    """

    kind: str
    data: list[int] | torch.Tensor
    loss: bool = False
    enable_cfg: bool = False
    special_token_label: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ITEM_KINDS:
            raise ValueError(f"PlanItem kind must be one of {ITEM_KINDS}, got {self.kind!r}.")
        if self.kind == TEXT:
            self.data = [int(t) for t in self.data]
        elif not (isinstance(self.data, torch.Tensor) and self.data.dim() == 3 and self.data.shape[0] == 3):
            shape = tuple(self.data.shape) if isinstance(self.data, torch.Tensor) else type(self.data).__name__
            raise ValueError(f"a {self.kind} item needs a (3, H, W) image tensor, got {shape}.")

    @classmethod
    def from_reference(cls, item: Mapping[str, Any], data: list[int] | torch.Tensor) -> PlanItem:
        """From a reference `sequence_plan` entry (`type`, `loss`, `enable_cfg`, `special_token_loss`,
        `special_token_label`) and its text ids or image tensor."""
        label = item.get("special_token_label") if item.get("special_token_loss", 0) else None
        return cls(item["type"], data, bool(item["loss"]), bool(item["enable_cfg"]), label)


def len2weight(num_tokens: int, reduction: str = "square") -> float:
    """CE weight of each of the `num_tokens` loss tokens of one text (the reference's `len2weight`):
    "square" 1/sqrt(n), "sample" 1/n, "token" 1."""
    if num_tokens == 0:
        return 0.0
    if reduction == "square":
        return 1 / (num_tokens**0.5)
    if reduction == "sample":
        return 1 / num_tokens
    if reduction == "token":
        return 1.0
    raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}.")


@dataclass
class PackingConfig:
    """The packing rules: the special token ids and the loss reduction, over the model's `BagelConfig`,
    which gives the grid sizes (ViT patch and grid, latent token and grid) and the CFG dropout
    probabilities. A dropout probability given here replaces the config's for this packing.

    `vae_token_stride` pixels make one latent token per side (16 for BAGEL).
    """

    model_config: Any
    bos_token_id: int
    eos_token_id: int
    start_of_image: int
    end_of_image: int
    loss_reduction: str = "square"
    text_cond_dropout_prob: float | None = None
    vit_cond_dropout_prob: float | None = None
    vae_cond_dropout_prob: float | None = None

    def __post_init__(self) -> None:
        len2weight(1, self.loss_reduction)  # validates the name
        if getattr(self.model_config, "interpolate_pos", False):
            raise ValueError(
                "interpolate_pos=True (interpolated ViT / latent position ids) is not supported by the "
                "packing; BAGEL was trained with interpolate_pos=False."
            )
        for name in DROPOUT_NAMES:
            if getattr(self, name) is None:
                setattr(self, name, getattr(self.model_config, name))
            check_number(name, getattr(self, name), minimum=0, maximum=1)

    @classmethod
    def from_model_config(cls, config, special_token_ids: Mapping[str, int], **overrides: Any) -> PackingConfig:
        """From a `BagelConfig` and the special ids (`BagelProcessor.special_token_ids` or the dict of
        `add_bagel_special_tokens`); `overrides`: `loss_reduction` and the dropout probabilities."""
        unknown = sorted(set(overrides) - {"loss_reduction", *DROPOUT_NAMES})
        if unknown:
            raise TypeError(
                f"PackingConfig.from_model_config got {unknown}: the packing takes the grid sizes from the model "
                "config; set them on the BagelConfig (e.g. BagelConfig(max_latent_size=...)), not here."
            )
        ids = {k: special_token_ids[k] for k in ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image")}
        return cls(config, **ids, **overrides)

    # The grid sizes: the model config's.
    @property
    def vit_patch_size(self) -> int:
        return self.model_config.vit_patch_size

    @property
    def vit_max_num_patch_per_side(self) -> int:
        return self.model_config.vit_max_num_patch_per_side

    @property
    def max_latent_size(self) -> int:
        return self.model_config.max_latent_size

    @property
    def vae_token_stride(self) -> int:
        """Pixels per latent token side."""
        return self.model_config.vae_token_stride

    def latent_grid(self, image: torch.Tensor) -> tuple[int, int]:
        """(h, w) latent tokens of a (3, H, W) VAE image; a clear error unless it fits the grid."""
        stride, (height, width) = self.vae_token_stride, image.shape[1:]
        if height % stride or width % stride:
            raise ValueError(
                f"VAE image size {height}x{width} (H x W) is not a multiple of {stride} pixels; "
                "resize it with the VAE transform (PlanBuilder / processing_bagel.resize_image)."
            )
        h, w = height // stride, width // stride
        if max(h, w) > self.max_latent_size:
            raise ValueError(
                f"VAE image {height}x{width} gives a {h}x{w} latent grid, larger than max_latent_size="
                f"{self.max_latent_size} per side; use smaller images (at most "
                f"{self.max_latent_size * stride} pixels a side)."
            )
        return h, w

    def item_length(self, item: PlanItem) -> int:
        """Tokens the item takes in a pack when not dropped (markers included)."""
        if item.kind == TEXT:
            return len(item.data) + 2
        if item.kind == VIT_IMAGE:
            p = self.vit_patch_size
            return (item.data.shape[1] // p) * (item.data.shape[2] // p) + 2
        h, w = self.latent_grid(item.data)
        return h * w + 2

    def plan_length(self, plan: Sequence[PlanItem]) -> int:
        """Tokens of a whole plan with nothing dropped (the reference's `num_tokens + 2 * len(plan)`)."""
        return sum(self.item_length(item) for item in plan)


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


class PackBuilder:
    """Lays out sample plans one after another as one packed sequence (the reference's
    `pack_sequence`). CFG dropout and timesteps are drawn from `generator` as items are added."""

    def __init__(self, config: PackingConfig, generator: torch.Generator | None = None):
        self.config = config
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.length = 0
        self.sample_lens: list[int] = []
        self.split_lens: list[int] = []
        self.attn_modes: list[str] = []
        self.position_ids: list[int] = []
        self.text_ids: list[int] = []
        self.text_indexes: list[int] = []
        self.label_ids: list[int] = []
        self.ce_indexes: list[int] = []
        self.ce_weights: list[float] = []
        self.vit_tokens: list[torch.Tensor] = []
        self.vit_position_ids: list[torch.Tensor] = []
        self.vit_indexes: list[int] = []
        self.vit_seqlens: list[int] = []
        self.vae_images: list[torch.Tensor] = []
        self.latent_shapes: list[tuple[int, int]] = []
        self.latent_position_ids: list[torch.Tensor] = []
        self.vae_indexes: list[int] = []
        self.timesteps: list[float] = []
        self.mse_indexes: list[int] = []

    def _dropped(self, item: PlanItem) -> bool:
        if not item.enable_cfg:
            return False
        prob = {
            TEXT: self.config.text_cond_dropout_prob,
            VIT_IMAGE: self.config.vit_cond_dropout_prob,
            VAE_IMAGE: self.config.vae_cond_dropout_prob,
        }[item.kind]
        return torch.rand((), generator=self.generator).item() < prob

    def _text_token(self, token: int) -> None:
        self.text_ids.append(token)
        self.text_indexes.append(self.length)
        self.length += 1

    def _closing_token(self, token: int, item: PlanItem) -> None:
        if item.special_token_label is not None:
            self.ce_indexes.append(self.length)
            self.ce_weights.append(1.0)
            self.label_ids.append(int(item.special_token_label))
        self._text_token(token)

    def _add_text(self, item: PlanItem) -> None:
        shifted = [self.config.bos_token_id] + item.data
        if item.loss:
            self.ce_indexes.extend(range(self.length, self.length + len(shifted)))
            self.ce_weights.extend([len2weight(len(shifted), self.config.loss_reduction)] * len(shifted))
            self.label_ids.extend(item.data + [self.config.eos_token_id])
        for token in shifted:
            self._text_token(token)
        self._closing_token(self.config.eos_token_id, item)

    def _add_vit_image(self, item: PlanItem) -> None:
        config = self.config
        patches, position_ids = patchify_vit(item.data, config.vit_patch_size, config.vit_max_num_patch_per_side)
        self._text_token(self.config.start_of_image)
        self.vit_indexes.extend(range(self.length, self.length + len(patches)))
        self.length += len(patches)
        self.vit_tokens.append(patches)
        self.vit_position_ids.append(position_ids)
        self.vit_seqlens.append(len(patches))
        self._closing_token(self.config.end_of_image, item)

    def _add_vae_image(self, item: PlanItem) -> None:
        h, w = self.config.latent_grid(item.data)
        self._text_token(self.config.start_of_image)
        self.vae_images.append(item.data)
        self.latent_shapes.append((h, w))
        self.latent_position_ids.append(latent_position_ids(h, w, self.config.max_latent_size))
        indexes = range(self.length, self.length + h * w)
        self.vae_indexes.extend(indexes)
        if item.loss:
            self.mse_indexes.extend(indexes)
            timestep = torch.randn((), generator=self.generator).item()
        else:
            timestep = -math.inf
        self.timesteps.extend([timestep] * (h * w))
        self.length += h * w
        self._closing_token(self.config.end_of_image, item)

    def add(self, plan: Sequence[PlanItem]) -> None:
        """Append one sample (its own attention block, rope restarting at 0)."""
        if not plan:
            raise ValueError("a sample plan needs at least one item.")
        start, rope = self.length, 0
        for item in plan:
            if self._dropped(item):
                rope += 0 if item.kind == TEXT else 1
                continue
            split_start = self.length
            if item.kind == TEXT:
                self._add_text(item)
            elif item.kind == VIT_IMAGE:
                self._add_vit_image(item)
            else:
                self._add_vae_image(item)
            split_len = self.length - split_start
            self.split_lens.append(split_len)
            if item.kind == TEXT:
                self.attn_modes.append("causal")
                self.position_ids.extend(range(rope, rope + split_len))
                rope += split_len
            else:
                noised = item.kind == VAE_IMAGE and item.loss
                self.attn_modes.append("noise" if noised else "full")
                self.position_ids.extend([rope] * split_len)
                rope += 0 if noised else 1  # the image being generated shares the next item's position
        if self.length > start:  # a sample whose every item was dropped leaves nothing behind
            self.sample_lens.append(self.length - start)

    def build(self) -> dict[str, Any]:
        """The pack: every training-forward keyword argument (tensors on the CPU), with
        `padded_images` (B, 3, H, W) (zero-padded to the largest VAE image, in pack order) in place of
        `padded_latent`. Keys of absent parts (no ViT image, no VAE image, no loss of a kind) are left out."""
        if not self.sample_lens:
            raise ValueError("cannot build an empty pack: add at least one sample.")
        long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        pack: dict[str, Any] = dict(
            sequence_length=self.length,
            sample_lens=list(self.sample_lens),
            split_lens=list(self.split_lens),
            attn_modes=list(self.attn_modes),
            packed_text_ids=long(self.text_ids),
            packed_text_indexes=long(self.text_indexes),
            packed_position_ids=long(self.position_ids),
        )
        if self.vit_tokens:
            pack.update(
                packed_vit_tokens=torch.cat(self.vit_tokens),
                packed_vit_position_ids=torch.cat(self.vit_position_ids),
                packed_vit_token_indexes=long(self.vit_indexes),
                vit_token_seqlens=long(self.vit_seqlens),
            )
        if self.vae_images:
            height = max(image.shape[1] for image in self.vae_images)
            width = max(image.shape[2] for image in self.vae_images)
            padded = torch.zeros(len(self.vae_images), 3, height, width)
            for slot, image in zip(padded, self.vae_images):
                slot[:, : image.shape[1], : image.shape[2]] = image
            pack.update(
                padded_images=padded,
                patchified_vae_latent_shapes=list(self.latent_shapes),
                packed_latent_position_ids=torch.cat(self.latent_position_ids),
                packed_vae_token_indexes=long(self.vae_indexes),
                packed_timesteps=torch.tensor(self.timesteps, dtype=torch.float32),
            )
            if self.mse_indexes:
                pack["mse_loss_indexes"] = long(self.mse_indexes)
        if self.ce_indexes:
            pack.update(
                packed_label_ids=long(self.label_ids),
                ce_loss_indexes=long(self.ce_indexes),
                ce_loss_weights=torch.tensor(self.ce_weights, dtype=torch.float32),
            )
        return pack


def pack_samples(
    plans: Iterable[Sequence[PlanItem]], config: PackingConfig, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """Pack `plans` in order into one pack (see `PackBuilder.build`)."""
    builder = PackBuilder(config, generator)
    for plan in plans:
        builder.add(plan)
    return builder.build()


class Packer:
    """Groups a stream of `(key, plan)` pairs into packs, as the reference's `PackedDataset` does.

    A pack is emitted once it holds `expected_num_tokens`. Plans longer than
    `max_num_tokens_per_sample` are skipped. A plan that would push the pack past `max_num_tokens`
    waits in an overflow buffer (at most `max_buffer_size` plans), which is drawn from first while the
    pack is shorter than `prefer_buffer_before`; when the buffer is full (or the plan came from it)
    the pack is emitted and the plan opens the next one (the reference drops it instead).

    `state_dict()` between packs holds the generator state and the keys of the waiting plans;
    `load_state_dict(state, read)` brings them back with `read(key) -> plan`, so a resumed stream gives
    exactly the packs that would have followed.
    """

    def __init__(
        self,
        config: PackingConfig,
        *,
        max_num_tokens: int = 36864,
        expected_num_tokens: int = 32768,
        max_num_tokens_per_sample: int = 16384,
        prefer_buffer_before: int = 16384,
        max_buffer_size: int = 50,
        seed: int = 0,
    ):
        self.config = config
        self.max_num_tokens = check_int("max_num_tokens", max_num_tokens, minimum=1)
        self.expected_num_tokens = check_int(
            "expected_num_tokens", expected_num_tokens, minimum=1, maximum=max_num_tokens, fix="At most max_num_tokens."
        )
        self.max_num_tokens_per_sample = check_int(
            "max_num_tokens_per_sample",
            max_num_tokens_per_sample,
            minimum=1,
            maximum=max_num_tokens,
            fix="At most max_num_tokens.",
        )
        self.prefer_buffer_before = check_int("prefer_buffer_before", prefer_buffer_before, minimum=0)
        self.max_buffer_size = check_int("max_buffer_size", max_buffer_size, minimum=0)
        seed = check_int("seed", seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: list[tuple[Any, list[PlanItem]]] = []
        self.carry: tuple[Any, list[PlanItem]] | None = None  # the plan that closed the last pack

    def state_dict(self) -> dict[str, Any]:
        return dict(
            generator=self.generator.get_state(),
            buffer=[key for key, _ in self.buffer],
            carry=None if self.carry is None else self.carry[0],
        )

    def load_state_dict(self, state: Mapping[str, Any], read: Callable[[Any], list[PlanItem]]) -> None:
        self.generator.set_state(state["generator"])
        self.buffer = [(key, read(key)) for key in state["buffer"]]
        self.carry = None if state["carry"] is None else (state["carry"], read(state["carry"]))

    def _next(self, samples: Iterator, length: int) -> tuple[Any, list[PlanItem], bool] | None:
        """The next plan to place: the carried one, a buffered one while the pack is short, else a new
        one (`None` once the stream and the buffer are both empty)."""
        if self.carry is not None:
            (key, plan), self.carry = self.carry, None
            return key, plan, True
        if self.buffer and length < self.prefer_buffer_before:
            return (*self.buffer.pop(0), True)
        for key, plan in samples:
            return key, plan, False
        if self.buffer:  # the stream ended: place what waits
            return (*self.buffer.pop(0), True)
        return None

    def packs(self, samples: Iterable[tuple[Any, Sequence[PlanItem]]]) -> Iterator[dict[str, Any]]:
        """Packs of the `(key, plan)` stream (after any loaded state); a finite stream ends with its
        last, possibly short, pack."""
        samples = iter(samples)
        builder = PackBuilder(self.config, self.generator)
        while (entry := self._next(samples, builder.length)) is not None:
            key, plan, waited = entry
            length = self.config.plan_length(plan)
            if length > self.max_num_tokens_per_sample:
                logger.warning(
                    f"skipping sample {key!r}: {length} tokens > max_num_tokens_per_sample "
                    f"({self.max_num_tokens_per_sample})."
                )
                continue
            if builder.length + length > self.max_num_tokens:
                if not waited and len(self.buffer) < self.max_buffer_size:
                    self.buffer.append((key, list(plan)))
                    continue
                self.carry = (key, list(plan))
                yield builder.build()
                builder = PackBuilder(self.config, self.generator)
                continue
            builder.add(plan)
            if builder.length >= self.expected_num_tokens:
                yield builder.build()
                builder = PackBuilder(self.config, self.generator)
        if builder.sample_lens:
            yield builder.build()


# ----------------------------------------------------------------------------------------------
# Task builders: user samples -> plans
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSizes:
    """A resize rule (processing_bagel.get_resize_size): longest side <= max_size, shortest >=
    min_size, sides multiples of stride, at most max_pixels pixels."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def transform(self, image: Image.Image, num_images: int = 1) -> torch.Tensor:
        """PIL image -> (3, H, W) float32 in [-1, 1]. `num_images` images of one sample share the pixel
        budget, as in the reference's understanding data."""
        image = resize_image(to_rgb(image), self.max_size, self.min_size, self.stride, self.max_pixels / num_images)
        return image_to_tensor(image)


#: Where the reference's training transforms differ from the processor's rules: ViT images of
#: understanding samples are at least 378 px a side and share 2_007_040 px; those of editing /
#: interleaved samples at most 518 px a side.
UNDERSTANDING_VIT_MIN_SIZE, UNDERSTANDING_VIT_MAX_PIXELS = 378, 2_007_040
EDIT_VIT_MAX_SIZE = 518


def training_image_sizes(settings: ImageSettings) -> dict[str, ImageSizes]:
    """The reference's training transforms over a processor's rules (`BagelProcessor.image_settings`,
    strides and largest sides from the model config): `vae_sizes` (generation and editing images),
    `vit_sizes` (understanding), `edit_vit_sizes` (editing / interleaved), as `PlanBuilder` takes them."""
    s = settings
    return dict(
        vae_sizes=ImageSizes(s.vae_max_size, s.vae_min_size, s.vae_stride, s.max_pixels),
        vit_sizes=ImageSizes(s.vit_max_size, UNDERSTANDING_VIT_MIN_SIZE, s.vit_stride, UNDERSTANDING_VIT_MAX_PIXELS),
        edit_vit_sizes=ImageSizes(min(EDIT_VIT_MAX_SIZE, s.vit_max_size), s.vit_min_size, s.vit_stride, s.max_pixels),
    )


class PlanBuilder:
    """Turns user samples into plans: tokenizes text (no special tokens added) and transforms images.

    Args:
        tokenizer: anything with `encode(text, add_special_tokens=False)` (a Qwen2 tokenizer, the
            `BagelProcessor`'s `.tokenizer`).
        vae_sizes, vit_sizes, edit_vit_sizes: the resize rules (default: `training_image_sizes` of
            BAGEL-7B-MoT's processor rules; `from_processor` takes a processor's).
    """

    def __init__(
        self,
        tokenizer,
        vae_sizes: ImageSizes | None = None,
        vit_sizes: ImageSizes | None = None,
        edit_vit_sizes: ImageSizes | None = None,
    ):
        self.tokenizer = tokenizer
        given = dict(vae_sizes=vae_sizes, vit_sizes=vit_sizes, edit_vit_sizes=edit_vit_sizes)
        if None in given.values():
            defaults = training_image_sizes(ImageSettings.from_config())
            given = {name: defaults[name] if rule is None else rule for name, rule in given.items()}
        self.vae_sizes, self.vit_sizes, self.edit_vit_sizes = given.values()

    @classmethod
    def from_processor(cls, processor, **sizes: ImageSizes) -> PlanBuilder:
        """With the processor's tokenizer and `training_image_sizes` of its rules (its model config's
        geometry); `sizes` replaces some of them."""
        return cls(processor.tokenizer, **{**training_image_sizes(processor.image_settings), **sizes})

    def tokenize(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}.")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, text: str, loss: bool = False, enable_cfg: bool = True) -> list[PlanItem]:
        """A text item (none when it tokenizes to nothing)."""
        ids = self.tokenize(text)
        return [PlanItem(TEXT, ids, loss=loss, enable_cfg=enable_cfg)] if ids else []

    def image(
        self, image: Image.Image, *, loss: bool = False, vae: bool = False, vit: bool = False, enable_cfg: bool = True
    ) -> list[PlanItem]:
        """An image as the reference's `_add_image`: with `loss` a noised VAE image to generate, then with
        `vae` its clean VAE latent, then with `vit` its ViT patches (editing-size ViT transform)."""
        if not (loss or vae or vit):
            raise ValueError("an image needs at least one of loss, vae, vit.")
        items = []
        latent_input = self.vae_sizes.transform(image) if loss or vae else None  # one resize serves both
        if loss:
            items.append(PlanItem(VAE_IMAGE, latent_input, loss=True))
        if vae:
            items.append(PlanItem(VAE_IMAGE, latent_input, enable_cfg=enable_cfg))
        if vit:
            items.append(PlanItem(VIT_IMAGE, self.edit_vit_sizes.transform(image), enable_cfg=enable_cfg))
        return items

    def text_to_image(self, caption: str, image: Image.Image) -> list[PlanItem]:
        """[caption (cfg), image to generate]. An empty caption still gives a text item (bos, eos)."""
        ids = self.tokenize(caption)
        return [PlanItem(TEXT, ids, enable_cfg=True)] + self.image(image, loss=True)

    def edit(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> list[PlanItem]:
        """An editing chain: `images[0]` is the source (clean VAE + ViT), `instructions[i]` turns
        `images[i]` into `images[i + 1]`; every target is generated (loss), intermediate ones are then
        entered clean (VAE + ViT) for the next step."""
        if len(images) < 2 or len(instructions) != len(images) - 1:
            raise ValueError(
                f"an edit needs N >= 2 images and N - 1 instructions, got {len(images)} images and "
                f"{len(instructions)} instructions."
            )
        plan = self.image(images[0], vae=True, vit=True)
        for step, (instruction, target) in enumerate(zip(instructions, images[1:]), start=1):
            plan += self.text(instruction)
            intermediate = step < len(instructions)
            plan += self.image(target, loss=True, vae=intermediate, vit=intermediate)
        return plan

    def understanding(
        self, images: Sequence[Image.Image], conversation: Sequence[Mapping[str, str]]
    ) -> list[PlanItem] | None:
        """A LLaVA-style conversation (`[{"from": "human" | "gpt", "value": str}, ...]`) whose human
        turns hold one `<image>` per image, in order. Human text has no loss, answers have; nothing is
        dropped for CFG. Returns None when no answer has tokens (the reference skips such samples)."""
        placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conversation if turn["from"] == "human")
        if placeholders != len(images):
            raise ValueError(
                f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholders in its human turns "
                f"but {len(images)} images were given; put one {IMAGE_PLACEHOLDER} per image."
            )
        remaining = iter(images)
        plan: list[PlanItem] = []
        for turn in conversation:
            if turn["from"] == "gpt":
                plan += self.text(turn["value"], loss=True, enable_cfg=False)
            elif turn["from"] == "human" and IMAGE_PLACEHOLDER not in turn["value"]:
                plan += self.text(turn["value"], enable_cfg=False)
            elif turn["from"] == "human":
                pieces = turn["value"].split(IMAGE_PLACEHOLDER)
                for index, piece in enumerate(pieces):
                    if piece.strip():
                        plan += self.text(piece.strip(), enable_cfg=False)
                    if index < len(pieces) - 1:
                        tensor = self.vit_sizes.transform(next(remaining), num_images=len(images))
                        plan.append(PlanItem(VIT_IMAGE, tensor))
            else:
                raise ValueError(f"conversation turns must come 'from' 'human' or 'gpt', got {turn['from']!r}.")
        return plan if any(item.loss for item in plan) else None

    def interleaved(self, segments: Sequence[Mapping[str, Any]]) -> list[PlanItem]:
        """Interleaved text and images: each segment `{"text": str, "loss": bool, "enable_cfg": bool}` or
        `{"image": PIL image, "loss": bool, "vae": bool, "vit": bool, "enable_cfg": bool}` (flags
        default to False, enable_cfg to True), as the reference's `_add_text` / `_add_image`."""
        plan: list[PlanItem] = []
        for segment in segments:
            flags = dict(loss=bool(segment.get("loss", False)), enable_cfg=bool(segment.get("enable_cfg", True)))
            if "text" in segment:
                plan += self.text(segment["text"], **flags)
            elif "image" in segment:
                views = dict(vae=bool(segment.get("vae")), vit=bool(segment.get("vit")))
                plan += self.image(segment["image"], **views, **flags)
            else:
                raise ValueError(f"an interleaved segment needs a 'text' or an 'image' key, got {sorted(segment)}.")
        return plan


# ----------------------------------------------------------------------------------------------
# The training step's side: a pack on the GPU, its images encoded
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(
    vae, images: torch.Tensor, shapes: Sequence[tuple[int, int]], latent_patch_size: int, sample: bool = True
) -> torch.Tensor:
    """Clean latents of a pack's VAE images: (B, z, max h*p, max w*p) float32, zero-padded.

    `images` (B, 3, H, W) are zero-padded; each is cropped to its own size (`shapes`: latent tokens
    h, w of p x p latent pixels) and images of one size are encoded together. (The reference encodes
    the padded batch, which lets the padding leak into smaller images' latents through the VAE's
    attention block.) `sample` draws from the posterior as the reference's training does; False
    takes its mean.
    """
    p, pixels = latent_patch_size, latent_patch_size * vae.downsample
    dtype = next(vae.parameters()).dtype
    height, width = (max(shape[i] for shape in shapes) * p for i in (0, 1))
    latents = images.new_zeros(len(images), vae.z_channels, height, width, dtype=torch.float32)
    for size in dict.fromkeys(tuple(shape) for shape in shapes):
        rows = [i for i, shape in enumerate(shapes) if tuple(shape) == size]
        batch = images[rows, :, : size[0] * pixels, : size[1] * pixels].to(dtype)
        latents[rows, :, : size[0] * p, : size[1] * p] = vae.encode(batch, sample=sample).float()
    return latents


def encode_pack(model, pack: Mapping[str, Any], device: torch.device | str, sample: bool = True) -> dict[str, Any]:
    """Training-forward kwargs from a pack: tensors moved to `device`, `padded_images` replaced by
    `padded_latent` (the model's VAE under no_grad, see `encode_latents`). `model(**kwargs)` runs it."""
    kwargs = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in pack.items()}
    images = kwargs.pop("padded_images", None)
    if images is not None:
        if getattr(model, "vae", None) is None:
            raise ValueError("the pack holds VAE images but the model has no VAE; load it with stage=2.")
        kwargs["padded_latent"] = encode_latents(
            model.vae, images, kwargs["patchified_vae_latent_shapes"], model.config.latent_patch_size, sample
        )
    return kwargs


__all__ = [
    "ImageSizes",
    "PackBuilder",
    "Packer",
    "PackingConfig",
    "PlanBuilder",
    "PlanItem",
    "encode_latents",
    "encode_pack",
    "len2weight",
    "pack_samples",
    "training_image_sizes",
]
