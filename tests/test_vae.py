"""The BAGEL VAE (FLUX autoencoder): parity with the reference on tiny-a, sampling, input checks, full size."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from bagel_remote.autoencoder_bagel import BagelAutoEncoder
from conftest import TINY_VAE_CONFIG, assert_close

# The released BAGEL / FLUX.1 VAE.
FULL_CONFIG = dict(TINY_VAE_CONFIG, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2)
# Parameter count of the FLUX.1 `ae.safetensors`.
FULL_PARAMETER_COUNT = 83_819_683


@pytest.fixture(scope="module")
def tiny_vae() -> BagelAutoEncoder:
    torch.manual_seed(0)
    return BagelAutoEncoder(TINY_VAE_CONFIG).eval()


@pytest.fixture(scope="module")
def parity_vae(parity) -> BagelAutoEncoder:
    from safetensors.torch import load_file

    config = json.loads((parity.checkpoint / "config.json").read_text())["vae_config"]
    vae = BagelAutoEncoder(config).eval()
    vae.load_state_dict(load_file(str(parity.checkpoint / "ae.safetensors")), strict=True)
    return vae


@torch.no_grad()
def test_parity_with_reference(parity, parity_vae):
    image = parity.case_inputs("vae")["image"]
    expected = {k[len("vae.") :]: v for k, v in parity.expected.items() if k.startswith("vae.")}

    moments = parity_vae.encode_moments(image)
    latent = parity_vae.encode(image)
    reconstruction = parity_vae.decode(latent)

    assert_close(moments, expected["moments"], rtol=1e-4, name="moments")
    assert_close(latent, expected["latent"], rtol=1e-4, name="latent")
    assert_close(reconstruction, expected["reconstruction"], rtol=1e-4, name="reconstruction")
    # Decoding the reference latent isolates the decoder from any encoder error.
    assert_close(parity_vae.decode(expected["latent"]), expected["reconstruction"], rtol=1e-4, name="decode")
    # The reference does not clamp; with random weights the output leaves [-1, 1], so clamping would show.
    assert expected["reconstruction"].abs().max() > 1


@torch.no_grad()
def test_latent_is_shifted_and_scaled_mean(tiny_vae):
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    mean, logvar = tiny_vae.encode_moments(image).chunk(2, dim=1)
    assert mean.shape == (2, 16, 4, 6)
    torch.testing.assert_close(tiny_vae.encode(image), 0.3611 * (mean - 0.1159))


@torch.no_grad()
def test_sampling_is_seeded_and_differs_from_mean(tiny_vae):
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    mean_latent = tiny_vae.encode(image)

    first = tiny_vae.encode(image, sample=True, generator=torch.Generator().manual_seed(7))
    again = tiny_vae.encode(image, sample=True, generator=torch.Generator().manual_seed(7))
    other = tiny_vae.encode(image, sample=True, generator=torch.Generator().manual_seed(8))

    assert not torch.allclose(first, mean_latent)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)

    # The draw is mean + exp(logvar / 2) * eps, with eps the generator's first normal draw.
    mean, logvar = tiny_vae.encode_moments(image).chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, 0.3611 * (mean + torch.exp(0.5 * logvar) * eps - 0.1159))


@torch.no_grad()
def test_decode_shape_and_attributes(tiny_vae):
    assert tiny_vae.downsample == 8
    assert tiny_vae.z_channels == 16
    assert tiny_vae.decode(torch.randn(2, 16, 3, 5)).shape == (2, 3, 24, 40)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 32, 32), "dims"),
        ((1, 1, 32, 32), "channels"),
        ((1, 4, 32, 32), "channels"),
        ((1, 32, 32, 3), "channels"),
        ((1, 3, 30, 32), "multiples of 8"),
        ((1, 3, 32, 36), "multiples of 8"),
    ],
)
def test_encode_rejects_bad_images(tiny_vae, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny_vae.encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 32, 4, 4), (1, 4, 4, 16), (16, 4, 4)])
def test_decode_rejects_bad_latents(tiny_vae, shape):
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        tiny_vae.decode(torch.zeros(shape))


def test_config_checks():
    with pytest.raises(ValueError, match="missing 'z_channels'"):
        BagelAutoEncoder({k: v for k, v in TINY_VAE_CONFIG.items() if k != "z_channels"})
    with pytest.raises(ValueError, match="downsample=16 contradicts"):
        BagelAutoEncoder(dict(TINY_VAE_CONFIG, downsample=16))


def test_full_size_on_meta():
    """The released architecture: parameter count and where the width changes, without memory."""
    with torch.device("meta"):
        vae = BagelAutoEncoder(SimpleNamespace(**FULL_CONFIG))  # an attribute-style config works too
    assert sum(p.numel() for p in vae.parameters()) == FULL_PARAMETER_COUNT
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert len(shapes) == 244
    # Widths 128, 256, 512, 512: a projection on the skip path exactly where a level changes width.
    assert sorted(k for k in shapes if "nin_shortcut.weight" in k) == [
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.up.1.block.0.nin_shortcut.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
    ]
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert shapes["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert "decoder.up.0.upsample.conv.weight" not in shapes


def test_low_precision_on_the_cpu_computes_in_float32(tiny_vae, monkeypatch):
    """bf16/fp16 convolutions on the CPU fall to aten's slow_conv2d (minutes for one decode): a
    low-precision VAE there runs its convolutions in float32 and returns its own dtype."""
    convs = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda x, w, *a, **k: convs.append((x.dtype, w.dtype)) or conv2d(x, w, *a, **k))
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for dtype in (torch.bfloat16, torch.float16):
        low = copy.deepcopy(tiny_vae).to(dtype)
        same_weights = copy.deepcopy(low).float()  # float32 with the low-precision values
        with torch.no_grad():
            convs.clear()
            latent = low.encode(image.to(dtype))
            decoded = low.decode(latent)
            assert convs and set(convs) == {(torch.float32, torch.float32)}, dtype
            assert latent.dtype == decoded.dtype == dtype
            assert {p.dtype for p in low.parameters()} == {dtype}  # the weights stay stored in low precision
            # The same float32 computation as a float32 VAE holding the low-precision values.
            moments = same_weights.encoder(image.to(dtype).float()).to(dtype)
            assert torch.equal(low.encode_moments(image.to(dtype)), moments), dtype
            z = latent / low.scale_factor + low.shift_factor
            assert torch.equal(decoded, same_weights.decoder(z.float()).to(dtype)), dtype
            assert_close(decoded, same_weights.decode(latent.float()), rtol=3e-2, name=f"{dtype} decode")
    with torch.no_grad():  # float32 stays on the plain path
        convs.clear()
        tiny_vae.decode(torch.zeros(1, 16, 2, 2))
        assert set(convs) == {(torch.float32, torch.float32)}
