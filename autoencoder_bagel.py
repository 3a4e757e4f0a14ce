"""The BAGEL VAE: the FLUX autoencoder (KL-regularised, 16 latent channels, 8x downsampling).

Parameter names follow the FLUX `ae.safetensors` checkpoint exactly, so the released weights load
with `load_state_dict(..., strict=True)` and no renaming. Images are RGB in [-1, 1], shape
(B, 3, H, W); latents are (B, z_channels, H / downsample, W / downsample), already shifted and
scaled the way the BAGEL transformer expects them.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .ops_bagel import forward_in_float32_on_cpu

__all__ = ["AttnBlock", "BagelAutoEncoder", "Decoder", "Downsample", "Encoder", "ResnetBlock", "Upsample"]

_CONFIG_KEYS = (
    "resolution",
    "in_channels",
    "downsample",
    "ch",
    "out_ch",
    "ch_mult",
    "num_res_blocks",
    "z_channels",
    "scale_factor",
    "shift_factor",
)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), the only nonlinearity of the autoencoder."""
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the FLUX settings: 32 groups, eps 1e-6, learned affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual. (B, C, H, W) -> same.

    q, k, v and the output projection are 1x1 convolutions (not linears) because that is how the
    checkpoint stores them: weights of shape (C, C, 1, 1).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, height, width = q.shape
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C): every pixel is a token, one head of width C.
        # Contiguous, so that SDPA can take its memory-efficient kernel (C=512 is too wide for
        # flash); with strided channels it falls back to the float32 math path, 2.4x slower.
        q, k, v = (t.reshape(b, 1, c, height * width).transpose(2, 3).contiguous() for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)
        return h.transpose(2, 3).reshape(b, c, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_out(self.attention(x))


class ResnetBlock(nn.Module):
    """Pre-norm residual block of two 3x3 convs. (B, in_channels, H, W) -> (B, out_channels, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # The skip path needs a projection only where the block changes the width; the checkpoint
        # has `nin_shortcut` exactly there, so it must not exist elsewhere (strict loading).
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        # No built-in padding: FLUX pads asymmetrically (right and bottom only) before the conv.
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv. (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class _MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image -> posterior moments. (B, in_channels, H, W) -> (B, 2*z_channels, H/f, W/f), f = 2**(levels-1).

    Level i runs `num_res_blocks` ResNet blocks at width ch*ch_mult[i], then halves the resolution
    (except the last level). The output holds the mean and the log-variance, concatenated on channels.
    """

    def __init__(self, in_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.num_resolutions = len(ch_mult)
        self.downsample_factor = 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            block_out = ch * mult
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)

        self.mid = _MidBlock(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, stride=1, padding=1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError that says what is wrong with `x` and how to fix it."""
        if x.dim() != 4:
            raise ValueError(
                f"expected an image batch of shape (B, {self.in_channels}, H, W), got {x.dim()} dims "
                f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0) for a single image"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} image channels (RGB, channels first), got shape {tuple(x.shape)}; "
                "convert the image to RGB and permute (B, H, W, C) to (B, C, H, W)"
            )
        height, width = x.shape[-2:]
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(
                f"image height and width must be multiples of {f} (the VAE downsample factor), got {height}x{width}; "
                f"resize or crop to e.g. {max(f, height // f * f)}x{max(f, width // f * f)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (unscaled) -> image. (B, z_channels, h, w) -> (B, out_ch, h*f, w*f), f = 2**(levels-1).

    The mirror of the encoder, with one extra ResNet block per level. `up[i]` is stored at the index
    of the encoder level it mirrors, so it runs from the last index down to 0 (the checkpoint layout).
    """

    def __init__(self, out_ch: int, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.z_channels = z_channels
        self.num_resolutions = len(ch_mult)

        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _MidBlock(block_in)

        levels = [None] * self.num_resolutions
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            if i_level != 0:
                level.upsample = Upsample(block_in)
            levels[i_level] = level
        self.up = nn.ModuleList(levels)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def check_input(self, z: torch.Tensor) -> None:
        """Raise a ValueError that says what is wrong with the latent `z` and how to fix it."""
        if z.dim() != 4 or z.shape[1] != self.z_channels:
            raise ValueError(
                f"expected a latent of shape (B, {self.z_channels}, h, w), got {tuple(z.shape)}; pass the output of "
                "encode() (unpatchify packed latent tokens to (B, C, h, w) first)"
            )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for block in level.block:
                h = block(h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def _config_value(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        if key not in config:
            raise ValueError(f"vae_config is missing {key!r}; it needs all of {', '.join(_CONFIG_KEYS)}")
        return config[key]
    if not hasattr(config, key):
        raise ValueError(f"vae_config is missing {key!r}; it needs all of {', '.join(_CONFIG_KEYS)}")
    return getattr(config, key)


class BagelAutoEncoder(nn.Module):
    """The FLUX VAE as BAGEL uses it: `encode` image -> scaled latent, `decode` scaled latent -> image.

    `vae_config` is a mapping (or an object with attributes) with the keys `resolution, in_channels,
    downsample, ch, out_ch, ch_mult, num_res_blocks, z_channels, scale_factor, shift_factor`.
    """

    def __init__(self, vae_config: Mapping[str, Any] | Any):
        super().__init__()
        values = {key: _config_value(vae_config, key) for key in _CONFIG_KEYS}
        ch_mult = list(values["ch_mult"])

        self.resolution = int(values["resolution"])
        self.in_channels = int(values["in_channels"])
        self.out_ch = int(values["out_ch"])
        self.z_channels = int(values["z_channels"])
        self.scale_factor = float(values["scale_factor"])
        self.shift_factor = float(values["shift_factor"])
        # The factor is fixed by the architecture (one halving per level but the last); the config
        # repeats it, so a disagreement means the config describes some other autoencoder.
        self.downsample = 2 ** (len(ch_mult) - 1)
        if int(values["downsample"]) != self.downsample:
            raise ValueError(
                f"vae_config downsample={values['downsample']} contradicts ch_mult={ch_mult}, which downsamples by "
                f"2**(len(ch_mult)-1)={self.downsample}; fix one of the two"
            )

        common = dict(
            ch=int(values["ch"]),
            ch_mult=ch_mult,
            num_res_blocks=int(values["num_res_blocks"]),
            z_channels=self.z_channels,
        )
        self.encoder = Encoder(in_channels=self.in_channels, **common)
        self.decoder = Decoder(out_ch=self.out_ch, **common)

    @staticmethod
    def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x), in the weights' dtype; bf16/fp16 weights on the CPU are used in float32:
        low-precision convolutions there fall to aten's slow_conv2d, which took 202 s for a 512x512
        decode that float32 does in 1 s."""
        return forward_in_float32_on_cpu(module, x, module.conv_in.weight)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> moments (B, 2*z, H/8, W/8): mean, then log-variance, on channels."""
        return self._run(self.encoder, x)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> latent (B, z, H/8, W/8), scaled as `scale * (z - shift)`.

        z is the posterior mean, or with `sample=True` a draw mean + std * eps, eps ~ N(0, 1) from
        `generator` (which must live on the input's device).
        """
        mean, logvar = self.encode_moments(x).chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar)
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * eps
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, z, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1] and NOT clamped."""
        return self._run(self.decoder, latent / self.scale_factor + self.shift_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct: decode(encode(x)) with the posterior mean. (B, 3, H, W) -> same."""
        return self.decode(self.encode(x))


def patchify_latent(latent: torch.Tensor, p: int) -> torch.Tensor:
    """(C, h*p, w*p) latent -> (h*w, p*p*C) tokens, each flattened in (py, px, channel) order."""
    c, hp, wp = latent.shape
    x = latent.reshape(c, hp // p, p, wp // p, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * c)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(h*w, p*p*C) tokens -> (C, h*p, w*p) latent."""
    c = tokens.shape[1] // (p * p)
    x = tokens.reshape(h, w, p, p, c)
    return torch.einsum("hwpqc->chpwq", x).reshape(c, h * p, w * p)
