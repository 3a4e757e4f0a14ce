"""A new user's first hour: the README's Quickstart commands, its snippets, and using this code
from a clone with the released repository."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text()
TRAINING_GUIDE = (REPO_ROOT / "docs" / "training.md").read_text()  # the README links to it


def _section(title: str, text: str = README) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("quickstart") / "bagel-tiny")


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TMPDIR=str(temp))
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_quickstart_is_two_commands_and_ci_runs_the_second():
    cpu, main = _blocks(_section("Quickstart"), "bash")
    # The CPU-only line comes first, before anything installs torch (else pip takes its CUDA build).
    assert cpu.strip() == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    commands = main.strip().splitlines()
    assert commands == [
        "pip install -r requirements.txt && python examples/quickstart.py",
        "pip install -r requirements-test.txt && python -m pytest tests -q",
    ]
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert ci.count(commands[1]) == 1  # exactly the README's test command ...
    pin = next(i for i, line in enumerate(ci) if re.search(r"pip install .*torch==\d", line))
    assert pin < ci.index(commands[1])  # ... after the pinned CPU torch, so that it is not the CUDA build
    requirements = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    assert "torch>=2.5" in requirements and not any(line.startswith("pytest") for line in requirements)
    test_requirements = (REPO_ROOT / "requirements-test.txt").read_text().splitlines()
    assert "-r requirements.txt" in test_requirements and any(line.startswith("pytest") for line in test_requirements)


def test_quickstart_demo_writes_images_and_leaves_no_checkpoint_behind(tmp_path):
    result = _run([str(REPO_ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "chat:" in result.stdout and "50/50" in result.stderr  # the default 50 steps, as the bar says
    generated = Image.open(tmp_path / "out" / "generated.png")
    edited = Image.open(tmp_path / "out" / "edited.png")
    # The tiny checkpoint's default size: the largest it generates; editing stays within it.
    assert generated.size == (256, 256) and generated.mode == "RGB"
    assert edited.size == (256, 256)
    assert len(generated.getcolors(maxcolors=1 << 24)) > 1  # a real picture, not a constant
    assert not list((tmp_path / "tmp").glob("bagel-tiny*"))  # the tiny checkpoint went with its temporary directory


def test_readme_use_snippet_runs_on_the_cpu_in_bf16(tiny, tmp_path, monkeypatch):
    """The "Use" snippet as a CPU user copies it (device_map="cpu", bf16), on the tiny checkpoint."""
    code = _blocks(_section("Use"), "python")[0]
    assert 'dtype=torch.bfloat16, device_map="cuda"' in code
    code = code.replace('device_map="cuda"', 'device_map="cpu"')
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (80, 60), "orange").save("cat.png")
    Image.new("RGB", (64, 48), "gray").save("room.png")
    load, rest = code.split("\n\n", 2)[:2], code.split("\n\n", 2)[2]
    assert "from_pretrained" in load[1] and "from_pretrained" not in rest
    namespace = {"REPO": str(tiny)}
    exec(compile("\n\n".join(load), "README Use", "exec"), namespace)
    model = namespace["model"]
    # Fewer steps and tokens keep CI fast (the tiny random model never says eos); the rest runs as written.
    model.generate_image = functools.partial(model.generate_image, num_steps=2, max_think_tokens=8)
    model.edit_image = functools.partial(model.edit_image, num_steps=2)
    model.chat = functools.partial(model.chat, max_new_tokens=8)
    model.interleave = functools.partial(model.interleave, max_new_tokens=8)
    exec(compile(rest, "README Use", "exec"), namespace)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.device.type == "cpu"
    assert isinstance(namespace["answer"], str)
    assert namespace["image"].size == (256, 256) and namespace["edited"].size == (256, 256)
    assert len(namespace["images"]) == 2 and isinstance(namespace["thought"], str)


def test_readme_streaming_snippet_prints_the_answer(tiny, tmp_path, monkeypatch, capsys):
    from transformers import AutoModel

    code = _blocks(_section("Use"), "python")[1]
    assert "TextIteratorStreamer" in code
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (80, 60), "orange").save("cat.png")
    model = AutoModel.from_pretrained(str(tiny), trust_remote_code=True)
    model.chat = functools.partial(model.chat, max_new_tokens=12)
    answer = model.chat(Image.open("cat.png"), "What is the cat doing?")
    capsys.readouterr()
    exec(compile(code, "README streaming", "exec"), {"model": model, "Image": Image})
    assert capsys.readouterr().out == answer and answer


def test_readme_training_example_runs(tiny):
    assert "(docs/training.md)" in _section("Fine-tuning")  # the README's way to the guide
    code = _blocks(_section("Training inputs", TRAINING_GUIDE), "python")[0]
    namespace = {"REPO": str(tiny)}
    exec(compile(code, "README Training inputs", "exec"), namespace)
    out, b, model = namespace["out"], namespace["b"], namespace["model"]
    assert out["ce"].shape == (len(b["labels"]),) and out["mse"].shape == (len(b["mse_idx"]), 64)
    assert b["attn_modes"] == ["full", "causal", "noise", "full", "causal", "causal"]
    assert torch.isfinite(namespace["loss"])
    assert model.model.llm2vae.weight.grad.abs().sum() > 0 and model.get_output_embeddings().weight.grad.abs().sum() > 0


def _released_copy(tiny: Path, dst: Path, keep_config: bool) -> Path:
    """The released repository's layout: weights, sidecar configs and tokenizer, no code and no
    auto_map (the tiny VAE needs a config.json for its size; without one, stage 1). The tiny
    processor's sizes are kept (without its auto_map) so that images stay small."""
    dst.mkdir()
    for file in tiny.iterdir():
        if file.suffix != ".py" and file.name not in ("processor_config.json", "config.json", "ae.safetensors"):
            shutil.copyfile(file, dst / file.name)
    names = ("processor_config.json", "config.json") if keep_config else ("processor_config.json",)
    for name in names:
        data = json.loads((tiny / name).read_text())
        del data["auto_map"]
        (dst / name).write_text(json.dumps(data))
    if keep_config:
        shutil.copyfile(tiny / "ae.safetensors", dst / "ae.safetensors")
    return dst


def test_released_repository_with_the_code_of_a_clone(tiny, tmp_path):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    released = _released_copy(tiny, tmp_path / "released", keep_config=False)
    Bagel = get_class_from_dynamic_module("modeling_bagel.BagelForUnifiedMultimodal", str(REPO_ROOT))
    model = Bagel.from_pretrained(released, stage=1, dtype=torch.float32, device_map="cpu")
    assert model.config.stage == 1 and isinstance(model.chat(None, "hello", max_new_tokens=3), str)
    # The command line, with a stage-2 released layout (a config.json without auto_map, no code).
    full = _released_copy(tiny, tmp_path / "released-full", keep_config=True)
    result = _run(
        [
            str(REPO_ROOT / "examples" / "quickstart.py"),
            "--model",
            str(full),
            "--steps",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "out" / "generated.png").size == (256, 256)


def test_plain_import_from_a_clone_says_what_to_do(tmp_path):
    for module in ("modeling_bagel", "configuration_bagel"):
        result = subprocess.run(
            [sys.executable, "-c", f"import {module}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode != 0
        assert "relative import" not in result.stderr
        assert "get_class_from_dynamic_module(" in result.stderr and "README" in result.stderr, result.stderr[-2000:]
