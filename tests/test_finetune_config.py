"""examples/finetune.py's inputs: the declared config (training/config.py) refuses bad keys
and values from the YAML file and the command line alike, naming the key; `--help`; data, freeze
and packing problems stopped before step 1 with a clear message. (A run without torchrun:
test_finetune_runs.py.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from bagel_remote.training import config as finetune_config
from bagel_remote.training.config import ConfigError
from bagel_remote.training.data import BagelPackedDataset, EditParquet, LlavaJsonl
from bagel_remote.training.loader import build_dataset
from bagel_remote.training.model import build_model
from bagel_remote.training.packing import PlanBuilder
from conftest import REPO_ROOT
from test_data import _png, write_t2i
from test_modeling import tiny_config
from test_packing import SMALL_SIZES, CharTokenizer, small_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("finetune_config") / "checkpoint")


# ----------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------

T2I = "{kind: t2i, path: data/t2i}"


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("lr=abc", "lr", "valid number"),
        ("lr=-1e-4", "lr", "greater than 0"),
        ("lr=.nan", "lr", "finite"),
        ("betas=[0.9]", "betas", "two numbers"),
        ("betas=[0.9, 1.5]", "betas", "[0, 1)"),
        ("max_steps=2.5", "max_steps", "valid integer"),
        ("max_steps=0", "max_steps", "greater than 0"),
        ("freeze_und=maybe", "freeze_und", "valid boolean"),
        ("freeze_und=1", "freeze_und", "valid boolean"),
        ("save_dtype=float33", "save_dtype", "'float32', 'bfloat16' or 'float16'"),
        ("optimizer=sgd", "optimizer", "'adamw' or 'adamw8bit'"),
        ("lora_sides=[und, side]", "lora_sides.1", "'und' or 'gen'"),
        ("activation_checkpointing=1.5", "activation_checkpointing", "fraction of the layers in [0, 1]"),
        ("lrr=1", "lrr", "unknown key (allowed: model, out_dir"),
        ("data={sources: [{kind: t2i, paths: data/t2i}]}", "data.sources.0.paths", "unknown key (allowed: kind, path"),
        ("data={sources: [{kind: t2i, paths: data/t2i}]}", "data.sources.0.path", "Field required"),
        ("data={sources: [{kind: video, path: v}]}", "data.sources.0.kind", "'t2i', 'edit' or 'llava'"),
        ("data={sources: [{kind: llava, path: a.jsonl}]}", "data.sources.0.image_dir", "needs image_dir"),
        ("data={sources: [{kind: t2i, path: t, image_dir: i}]}", "data.sources.0.image_dir", "only llava"),
        ("data={sources: []}", "data.sources", "at least 1 item"),
        (
            f"data={{sources: [{T2I}], max_num_tokens: 1000, expected_num_tokens: 900, "
            "max_num_tokens_per_sample: 2000}",
            "data.max_num_tokens_per_sample",
            "above max_num_tokens (1000)",
        ),
        (f"data={{sources: [{T2I}], max_num_tokens: 1000}}", "data.expected_num_tokens", "above max_num_tokens"),
        (f"data={{sources: [{T2I}], weights: [1, 2]}}", "data.weights", "one non-negative weight per source (1)"),
        (f"data={{sources: [{T2I}], num_workers: -1}}", "data.num_workers", "greater than or equal to 0"),
        (f"data={{sources: [{T2I}], workers: 2}}", "data.workers", "unknown key"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path, override, key, allowed):
    with pytest.raises(ConfigError) as error:
        finetune_config.load_config([override])
    message = str(error.value)
    assert f"\n  {key}" in message and allowed in message, message
    # the same key in the YAML file: the same message
    name, _, value = override.partition("=")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({name: yaml.safe_load(value)}))
    with pytest.raises(ConfigError) as from_file:
        finetune_config.load_config([str(tmp_path / "run.yaml")])
    assert str(from_file.value) == message


def test_switches_that_train_nothing_or_contradict_are_refused(checkpoint):
    with pytest.raises(ConfigError, match=r"lora_sides: with freeze_und .*use lora_sides=\[gen\]"):
        finetune_config.load_config(["lora_rank=8", "freeze_und=true"])  # lora_sides defaults to [und, gen]
    with pytest.raises(ConfigError, match="freeze_llm: LoRA .* adapts the decoder"):
        finetune_config.load_config(["lora_rank=8", "freeze_llm=true"])
    assert finetune_config.load_config(["lora_rank=8", "freeze_und=true", "lora_sides=[gen]"])["lora_sides"] == ["gen"]
    # a stage-1 model (no GEN weights) with the understanding path frozen: found before any weight is read
    cfg = finetune_config.load_config(["freeze_und=true", "freeze_vit=true"])
    with pytest.raises(ConfigError, match=r"Nothing to train: \{'freeze_vit': True, 'freeze_und': True\}.*stage-1"):
        build_model(cfg, None, tiny_config(stage=1), torch.device("cpu"), None)


def test_values_read_as_yaml_and_defaults_from_the_schema(tmp_path):
    cfg = finetune_config.load_config(["lr=1e-3", "betas=[0.8, 0.9]", "activation_checkpointing=0.25"])
    assert cfg["lr"] == 1e-3 and cfg["betas"] == (0.8, 0.9) and cfg["activation_checkpointing"] == 0.25
    template = yaml.safe_load((REPO_ROOT / "examples" / "finetune.yaml").read_text())
    assert finetune_config.validate(template) == finetune_config.validate({})  # the template shows the defaults
    with pytest.raises(ConfigError, match="'lr': overrides are key=value"):
        finetune_config.load_config([str(REPO_ROOT / "examples" / "finetune.yaml"), "lr"])
    with pytest.raises(ConfigError, match="config file 'missing.yaml' not found"):
        finetune_config.load_config(["missing.yaml"])
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a YAML mapping"):
        finetune_config.load_config([str(tmp_path / "list.yaml")])
    with pytest.raises(ConfigError, match=r"'betas=\[0.9,': not valid YAML"):
        finetune_config.load_config(["betas=[0.9,"])
    (tmp_path / "broken.yaml").write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        finetune_config.load_config([str(tmp_path / "broken.yaml")])


def test_help_lists_every_key():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "finetune.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for key in (
        *finetune_config.FinetuneConfig.model_fields,
        "data.max_num_tokens_per_sample",
        "data.sources[].image_dir",
    ):
        assert f"  {key} " in result.stdout, key


def test_the_trainer_exits_with_the_configs_message():
    """examples/finetune.py with bad keys, or without data: exit status 1 and the message, no traceback."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "finetune.py"), "lrr=1", "lr=abc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "\n  lrr: unknown key" in result.stderr and "\n  lr: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    no_data = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "finetune.py")], capture_output=True, text=True, timeout=120
    )
    assert no_data.returncode == 1 and "Set data=: a file of packs" in no_data.stderr, no_data.stderr
    assert "Traceback" not in no_data.stderr


# ----------------------------------------------------------------------------------------------
# Data problems before step 1
# ----------------------------------------------------------------------------------------------


def _data_cfg(**source) -> dict:
    return finetune_config.load_config([f"data={json.dumps({'sources': [source]})}"])


def test_data_that_cannot_give_a_sample_stops_before_the_model(tmp_path, checkpoint):
    config = tiny_config(stage=2)
    build = lambda cfg: build_dataset(cfg, config, checkpoint, 0, 1)  # noqa: E731
    (tmp_path / "images").mkdir()
    no_answer = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]}
    (tmp_path / "silent.jsonl").write_text(json.dumps(no_answer) + "\n")
    cases = [
        (
            dict(kind="llava", path=str(tmp_path / "silent.jsonl"), image_dir=str(tmp_path / "images")),
            r"data.sources.0 \(llava: .*silent.jsonl\): no readable sample: .*none of the 1 rows",
        ),
        (
            dict(kind="llava", path=str(tmp_path / "silent.jsonl"), image_dir=str(tmp_path / "nowhere")),
            r"data.sources.0 .*image_dir '.*nowhere' is not a directory",
        ),
        (dict(kind="t2i", path=str(tmp_path / "absent")), r"data.sources.0 \(t2i: .*absent\).*no parquet file"),
    ]
    pq.write_table(pa.table({"image": [b"not an image"], "captions": ['{"a": "x"}']}), tmp_path / "broken.parquet")
    cases.append(
        (
            dict(kind="t2i", path=str(tmp_path / "broken.parquet")),
            r"data.sources.0 \(t2i: .*broken.parquet\): no readable sample: .*row 0 .*cannot identify image",
        )
    )
    for source, message in cases:
        with pytest.raises(ConfigError, match=message):
            build(_data_cfg(**source))
    with pytest.raises(ConfigError, match="data=.*missing.pt.*no such file of packs"):
        build_dataset(finetune_config.load_config([f"data={tmp_path / 'missing.pt'}"]), config, checkpoint, 0, 1)
    # and a source that reads
    write_t2i(tmp_path / "t2i", files=1, row_groups=1, rows=1)
    assert build(_data_cfg(kind="t2i", path=str(tmp_path / "t2i"))) is not None


def test_packing_samples_all_too_long_says_so(tmp_path):
    """Every sample longer than max_num_tokens_per_sample: an error naming it, not an endless loop."""
    write_t2i(tmp_path / "t2i", files=1, row_groups=1, rows=3)
    from bagel_remote.training.data import T2IParquet

    dataset = BagelPackedDataset(
        [T2IParquet(tmp_path / "t2i")],
        PlanBuilder(CharTokenizer(), **SMALL_SIZES),
        small_config(),
        max_num_tokens=64,
        expected_num_tokens=32,
        max_num_tokens_per_sample=8,
    )
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("packing looped on samples it can never pack"))
    signal.alarm(60)
    try:
        with pytest.raises(ValueError, match=r"all 3 samples .* longer than max_num_tokens_per_sample=8 \(\d+ to \d+"):
            next(iter(dataset))
    finally:
        signal.alarm(0)


def test_edit_instructions_given_as_strings_are_whole_instructions(tmp_path):
    builder = PlanBuilder(CharTokenizer(), **SMALL_SIZES)
    images = [_png(32, 32, i) for i in range(3)]
    pq.write_table(
        pa.table({"image_list": [images], "instruction_list": [["make it red", "make it big"]]}),
        tmp_path / "edit.parquet",
    )
    source = EditParquet(tmp_path / "edit.parquet")
    row = source.read_chunk(source.chunks()[0])[0]
    texts = set()
    for seed in range(20):
        plan = source.to_plan(row, builder, torch.Generator().manual_seed(seed))
        texts |= {"".join(chr(i - 20) for i in item.data) for item in plan if item.kind == "text"}
    assert texts <= {"make it red", "make it big", "make it red. make it big."} and "make it red" in texts
    for bad in ([["make it red"], []], [[1], ["x"]]):
        with pytest.raises(ValueError, match="instruction_list must hold, per step, an instruction or a non-empty"):
            source.to_plan({"image_list": images, "instruction_list": bad}, builder, torch.Generator())


def test_llava_image_dir_must_exist(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"conversations": []}\n')
    with pytest.raises(FileNotFoundError, match="image_dir '.*nope' is not a directory"):
        LlavaJsonl(tmp_path / "a.jsonl", tmp_path / "nope")
