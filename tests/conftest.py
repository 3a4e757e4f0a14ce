"""Shared fixtures: the parity fixtures of the reference implementation live beside the repo."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PARITY_DIR = REPO_ROOT.parent / "shared" / "parity" / "tiny-a"
# A small FLUX-shaped VAE for the tests that need no fixture (the shape of tiny-a's VAE).
TINY_VAE_CONFIG = {
    "resolution": 256,
    "in_channels": 3,
    "downsample": 8,
    "ch": 32,
    "out_ch": 3,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "z_channels": 16,
    "scale_factor": 0.3611,
    "shift_factor": 0.1159,
}

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from repo_package import import_repo  # noqa: E402

# Tests import the remote-code modules as `from bagel_remote.modeling_bagel import ...`.
import_repo()


def require_fixture(directory: Path) -> Path:
    """A reference fixture directory of ../shared/parity; skip without it, fail under CI=true."""
    if directory.is_dir():
        return directory
    reason = f"reference fixture not found at {directory} (fixtures live in ../shared/parity beside the repo)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class Parity:
    """The tiny-a fixture: checkpoint dir, inputs, expected outputs and the json scalars."""

    def __init__(self, root: Path):
        from safetensors.torch import load_file

        self.root = root
        self.checkpoint = root / "checkpoint"
        self.inputs = load_file(str(root / "inputs.safetensors"))
        self.expected = load_file(str(root / "expected.safetensors"))
        self.meta = json.loads((root / "fixture.json").read_text())

    def case_inputs(self, case: str) -> dict:
        prefix = case + "."
        return {k[len(prefix) :]: v for k, v in self.inputs.items() if k.startswith(prefix)}

    def train_batch(self) -> dict:
        """The train case as training-forward keyword arguments (the reference's noise as `packed_noise`)."""
        inputs = self.case_inputs("train")
        meta = self.meta["cases"]["train"]
        noise = inputs.pop("noise")
        inputs.pop("padded_images")
        keys = ("sequence_length", "sample_lens", "split_lens", "attn_modes", "patchified_vae_latent_shapes")
        return dict(inputs, packed_noise=noise, **{k: meta[k] for k in keys})

    def guidance_params(self, case: str, **overrides):
        """The GuidanceParams the reference sampled `case` ("t2i", "edit", ...) with."""
        from bagel_remote.guidance_bagel import GuidanceParams

        p = self.meta["cases"][case]["params"]
        names = ("num_timesteps", "timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_type")
        kwargs = {name: p[name] for name in names}
        kwargs.update(cfg_interval=tuple(p["cfg_interval"]), cfg_renorm_min=p["cfg_renorm_min"])
        return GuidanceParams(**{**kwargs, **overrides})

    def understanding_batch(self) -> dict:
        """The train case's sample 2 alone (a `full` ViT image, then `causal` text with all the CE
        tokens) as a training-forward batch: what a stage-1 model must reproduce `train.ce` from."""
        ti = self.case_inputs("train")
        meta = self.meta["cases"]["train"]
        off, length = meta["sample_lens"]
        assert off + length == meta["sequence_length"]
        assert bool((ti["ce_loss_indexes"] >= off).all()), "all CE tokens must lie in sample 2"
        assert bool((ti["packed_vit_token_indexes"] >= off).all())
        assert bool((ti["packed_vae_token_indexes"] < off).all())
        split_lens, modes = meta["split_lens"][-2:], meta["attn_modes"][-2:]
        assert sum(split_lens) == length and modes == ["full", "causal"]
        text = ti["packed_text_indexes"] >= off
        return dict(
            sequence_length=length,
            sample_lens=[length],
            split_lens=split_lens,
            attn_modes=modes,
            packed_text_ids=ti["packed_text_ids"][text],
            packed_text_indexes=ti["packed_text_indexes"][text] - off,
            packed_position_ids=ti["packed_position_ids"][off:],
            packed_vit_tokens=ti["packed_vit_tokens"],
            packed_vit_token_indexes=ti["packed_vit_token_indexes"] - off,
            packed_vit_position_ids=ti["packed_vit_position_ids"],
            vit_token_seqlens=ti["vit_token_seqlens"],
            ce_loss_indexes=ti["ce_loss_indexes"] - off,
            packed_label_ids=ti["packed_label_ids"],
        )


@pytest.fixture(scope="session")
def parity() -> Parity:
    return Parity(require_fixture(PARITY_DIR))


def _tiny_a_geometry():
    """A config with the tiny-a checkpoint's image geometry (ViT grid 8 x 8 patches of 14, latents up to 8 x 8 of
    16 px): the processor takes its strides and largest sides (112, 128) from it."""
    from bagel_remote.configuration_bagel import BagelConfig

    return BagelConfig(vit_max_num_patch_per_side=8, max_latent_size=8)


# The processor for tiny-a: its config's geometry, smallest sides of its own.
TINY_PROCESSOR_SIZES = dict(config=_tiny_a_geometry(), vit_min_size=28, vae_min_size=64)


@pytest.fixture(scope="session")
def tiny_model(parity):
    """The tiny-a checkpoint (stage 2, float32, CPU, eval), loaded once for the session; tests
    that share it must leave it as they found it."""
    from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal

    return BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint)


@pytest.fixture(scope="session")
def tiny_processor():
    """A BagelProcessor over the tiny byte-level tokenizer (scripts/tiny_tokenizer.py, whose special
    tokens sit at tiny-a's ids), sized for tiny-a."""
    from bagel_remote.processing_bagel import BagelProcessor
    from tiny_tokenizer import build_tiny_tokenizer

    return BagelProcessor(build_tiny_tokenizer(None, vocab_size=320), **TINY_PROCESSOR_SIZES)


class Recording:
    """A step-cache policy that keeps the state of its last call (to read its counters afterwards)."""

    def __init__(self, policy):
        self.policy, self.run = policy, None

    def start(self, timesteps, head=None):
        self.run = self.policy.start(timesteps, head)
        return self.run


def assert_close(actual, expected, rtol: float = 1e-4, name: str = "") -> None:
    """Relative error measured against the largest reference magnitude (robust near zero)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() or 1.0
    assert err <= rtol * scale, f"{name}: max abs error {err:.3e} > {rtol} x max |ref| {scale:.3e}"


@pytest.fixture
def tensor_reads(monkeypatch) -> list:
    """The keys read through `safetensors.safe_open` (by the adapter and by the loader)."""
    import safetensors
    from bagel_remote import state_dict_adapter

    read: list[str] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(state_dict_adapter, "safe_open", Recording)
    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return read


@pytest.fixture
def transformers_reads(monkeypatch) -> list:
    """The checkpoint keys whose data transformers' loader reads: it opens each safetensors file
    with `safe_open` and takes lazy slices, read when indexed. (A test-only hook into where
    transformers 5 imports safe_open.)"""
    from transformers import modeling_utils

    read: list[str] = []
    real_open = modeling_utils.safe_open

    class RecordingSlice:
        def __init__(self, key, inner):
            self.key, self.inner = key, inner

        def __getitem__(self, index):
            read.append(self.key)
            return self.inner[index]

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class RecordingFile:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def get_slice(self, key):
            return RecordingSlice(key, self.handle.get_slice(key))

        def get_tensor(self, key):
            read.append(key)
            return self.handle.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(modeling_utils, "safe_open", RecordingFile)
    return read
