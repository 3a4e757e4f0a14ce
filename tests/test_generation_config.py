"""Sampling defaults in generation_config.json (generation_config_bagel.py): a checkpoint's file
changes what `generate_image`, `edit_image` and `chat` use when the call gives nothing, an explicit
argument still wins, a checkpoint without the file samples as before, and bad files fail by name."""

from __future__ import annotations

import json

import pytest
import torch
from bagel_remote.generation_config_bagel import TEXT
from bagel_remote.guidance_bagel import IMAGE_EDITING, IMAGE_GENERATION, GuidanceParams
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal
from PIL import Image

PROMPT = "a red square"
SMALL = dict(height=32, width=32, seed=0, progress=False)
EDIT = dict(seed=0, progress=False)


def _checkpoint(parity, tmp_path, generation_config: dict | None):
    """tiny-a's files (linked), plus a generation_config.json when given."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for file in parity.checkpoint.iterdir():
        (directory / file.name).symlink_to(file)
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory


def _recording(model) -> list[GuidanceParams]:
    """The GuidanceParams each generation runs with (recorded on the way into generate_latents)."""
    seen, run = [], model.generate_latents

    def generate_latents(*args, **kwargs):
        seen.append(args[5])
        return run(*args, **kwargs)

    model.generate_latents = generate_latents
    return seen


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float()


def test_a_checkpoint_without_the_file_samples_as_before(parity, tiny_processor, tmp_path):
    model = BagelForUnifiedMultimodal.from_pretrained(_checkpoint(parity, tmp_path, None))
    config = model.generation_config
    assert config.image_generation["num_steps"] == 50 and config.image_editing["cfg_renorm_type"] == "text_channel"
    assert (config.max_new_tokens, config.max_think_tokens, config.do_sample) == (512, 1000, False)
    seen = _recording(model)
    model.generate_image(PROMPT, processor=tiny_processor, num_steps=2, **SMALL)
    model.edit_image(Image.new("RGB", (32, 32), "blue"), "make it red", processor=tiny_processor, num_steps=2, **EDIT)
    # the values the API typed before they moved into the generation config
    assert seen == [
        GuidanceParams(3, 3.0, 4.0, 1.0, (0.4, 1.0), "global", 0.0),
        GuidanceParams(3, 3.0, 4.0, 2.0, (0.0, 1.0), "text_channel", 0.0),
    ]


def test_the_files_values_are_used_and_an_argument_still_wins(parity, tiny_processor, tmp_path):
    file = {
        "image_generation": {"num_steps": 3, "cfg_text_scale": 1.0},
        "image_editing": {"cfg_img_scale": 1.5, "num_steps": 2},
    }
    model = BagelForUnifiedMultimodal.from_pretrained(_checkpoint(parity, tmp_path, file))
    seen = _recording(model)
    from_file = model.generate_image(PROMPT, processor=tiny_processor, **SMALL)
    explicit = model.generate_image(PROMPT, processor=tiny_processor, num_steps=2, cfg_text_scale=4.0, **SMALL)
    model.edit_image(Image.new("RGB", (32, 32), "blue"), "make it red", processor=tiny_processor, **EDIT)
    assert seen[0] == GuidanceParams(4, 3.0, 1.0, 1.0, (0.4, 1.0), "global", 0.0)  # the file's, the rest default
    assert seen[1] == GuidanceParams(3, 3.0, 4.0, 1.0, (0.4, 1.0), "global", 0.0)  # the call's
    assert seen[2] == GuidanceParams(3, 3.0, 4.0, 1.5, (0.0, 1.0), "text_channel", 0.0)  # editing's own dict

    # the same numbers as a model without the file given the same arguments
    plain = BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint)
    same = plain.generate_image(PROMPT, processor=tiny_processor, num_steps=3, cfg_text_scale=1.0, **SMALL)
    assert torch.equal(_pixels(from_file), _pixels(same))
    assert not torch.equal(_pixels(from_file), _pixels(explicit))


def test_default_sampling_arguments_are_what_a_call_uses(parity, tmp_path):
    """The public read of the defaults (the demo's sliders start from it): the file's values where
    it sets them, BAGEL's elsewhere, per task; an unknown task refused by name."""
    file = {"image_editing": {"cfg_img_scale": 1.5}, "max_new_tokens": 7}
    model = BagelForUnifiedMultimodal.from_pretrained(_checkpoint(parity, tmp_path, file))
    edit = model.default_sampling_arguments("image_editing")
    assert edit["cfg_img_scale"] == 1.5 and edit["max_new_tokens"] == 7
    assert edit["num_steps"] == IMAGE_EDITING["num_steps"] and edit["temperature"] == TEXT["temperature"]
    assert model.default_sampling_arguments("image_generation")["cfg_img_scale"] == IMAGE_GENERATION["cfg_img_scale"]
    text = model.default_sampling_arguments()
    assert text == {**TEXT, "max_new_tokens": 7}
    with pytest.raises(ValueError, match="task"):
        model.default_sampling_arguments("text_to_image")


def test_chat_takes_its_text_defaults_from_the_file(parity, tiny_processor, tmp_path):
    model = BagelForUnifiedMultimodal.from_pretrained(_checkpoint(parity, tmp_path, {"max_new_tokens": 2}))
    lengths = []
    decode = model.generate_text_ids

    def generate_text_ids(*args, **kwargs):
        lengths.append(kwargs["max_length"])
        return decode(*args, **kwargs)

    model.generate_text_ids = generate_text_ids
    model.chat(None, "hello", processor=tiny_processor)
    model.chat(None, "hello", processor=tiny_processor, max_new_tokens=5)
    assert lengths == [3, 6]  # bos + max_new_tokens: the file's 2, then the call's 5


def test_save_pretrained_writes_the_generation_config(parity, tmp_path):
    model = BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint)
    model.generation_config.image_generation["cfg_text_scale"] = 6.0
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert written["image_generation"]["cfg_text_scale"] == 6.0 and written["max_think_tokens"] == 1000
    reloaded = BagelForUnifiedMultimodal.from_pretrained(tmp_path / "saved")
    assert reloaded.generation_config.image_generation["cfg_text_scale"] == 6.0
    assert written["image_editing"] == dict(IMAGE_EDITING, cfg_interval=[0.0, 1.0])  # json has lists


@pytest.mark.parametrize(
    "file, error, names",
    [
        ({"image_generation": {"cfg_scale": 2.0}}, ValueError, ("image_generation", "cfg_scale")),
        ({"image_editing": {"cfg_text_scale": -1}}, ValueError, ("image_editing", "cfg_text_scale")),
        ({"image_generation": {"num_steps": "20"}}, TypeError, ("image_generation", "num_steps")),
        ({"image_generation": [50]}, TypeError, "image_generation"),
    ],
    ids=["unknown-key", "negative-scale", "quoted-steps", "not-a-dict"],
)
def test_a_bad_file_fails_by_name(parity, tmp_path, file, error, names):
    with pytest.raises(error) as raised:
        BagelForUnifiedMultimodal.from_pretrained(_checkpoint(parity, tmp_path, file))
    for name in (names,) if isinstance(names, str) else names:
        assert name in str(raised.value)


def test_remote_code_from_a_hub_like_directory_reads_the_file(parity, tmp_path, monkeypatch):
    """The way users load: `AutoModel.from_pretrained(dir, trust_remote_code=True)` runs the
    directory's own copy of this code, which reads its generation_config.json as well."""
    import shutil

    from bagel_remote.loading_bagel import AUTO_MAP, remote_code_files
    from conftest import REPO_ROOT
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = _checkpoint(parity, tmp_path, {"image_generation": {"cfg_text_scale": 6.5}, "max_new_tokens": 77})
    for name, source in remote_code_files(REPO_ROOT).items():
        shutil.copyfile(source, repo / name)
    config = json.loads((repo / "config.json").read_text())
    (repo / "config.json").unlink()  # a link into the fixture: write a file of its own
    (repo / "config.json").write_text(json.dumps({**config, "auto_map": dict(AUTO_MAP)}))
    model = AutoModel.from_pretrained(str(repo), trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules.")
    assert model.generation_config.image_generation["cfg_text_scale"] == 6.5
    assert model.generation_config.image_generation["num_steps"] == 50  # merged key by key
    assert model.generation_config.max_new_tokens == 77
