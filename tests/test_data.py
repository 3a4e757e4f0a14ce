"""Tests of training/data.py: the three readers on small files written here, sharding over ranks and
workers, weighted mixing, and exact resume (in process and through StatefulDataLoader workers)."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from bagel_remote.training.data import (
    BagelPackedDataset,
    EditParquet,
    LlavaJsonl,
    SourceStream,
    T2IParquet,
)
from bagel_remote.training.packing import PlanBuilder
from PIL import Image
from test_packing import SMALL_SIZES, CharTokenizer, _pil, small_config


def _png(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    _pil(width, height, seed).save(buffer, format="PNG")
    return buffer.getvalue()


def _text(ids) -> str:
    return "".join(chr(i - 20) for i in ids)


def write_t2i(directory, files: int = 3, row_groups: int = 2, rows: int = 3):
    """`files` parquet files of `row_groups` x `rows` rows; row n has the caption "r<n>"."""
    directory.mkdir(parents=True)
    n = 0
    for f in range(files):
        with pq.ParquetWriter(
            directory / f"part-{f}.parquet", pa.schema([("image", pa.binary()), ("captions", pa.string())])
        ) as writer:
            for _ in range(row_groups):
                batch = {"image": [], "captions": []}
                for _ in range(rows):
                    batch["image"].append(_png(32, 32, n))
                    batch["captions"].append(json.dumps({"short": f"r{n}", "long": f"r{n}"}))
                    n += 1
                writer.write_table(pa.table(batch))
    return directory


@pytest.fixture
def builder():
    return PlanBuilder(CharTokenizer(), **SMALL_SIZES)


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def test_t2i_parquet_reader(tmp_path, builder):
    source = T2IParquet(write_t2i(tmp_path / "t2i", files=1, row_groups=2, rows=2))
    assert [(c.row_group, c.num_rows) for c in source.chunks()] == [(0, 2), (1, 2)]
    row = source.read_chunk(source.chunks()[1])[0]
    plan = source.to_plan(row, builder, torch.Generator().manual_seed(0))
    assert [(i.kind, i.loss, i.enable_cfg) for i in plan] == [("text", False, True), ("vae_image", True, False)]
    assert _text(plan[0].data) == "r2" and plan[1].data.shape == (3, 32, 32)
    # The image is the row's, through the VAE transform.
    expected = SMALL_SIZES["vae_sizes"].transform(Image.open(io.BytesIO(_png(32, 32, 2))))
    assert torch.equal(plan[1].data, expected)
    with pytest.raises(ValueError, match="captions"):
        pq.write_table(pa.table({"image": [b""]}), tmp_path / "bad.parquet")
        T2IParquet(tmp_path / "bad.parquet")


def test_edit_parquet_reader(tmp_path, builder):
    images = [_png(32, 32, i) for i in range(3)]
    instructions = [["make it red", "redden"], ["make it big"]]
    pq.write_table(pa.table({"image_list": [images], "instruction_list": [instructions]}), tmp_path / "edit.parquet")
    source = EditParquet(tmp_path / "edit.parquet")
    row = source.read_chunk(source.chunks()[0])[0]
    kinds = Counter()
    for seed in range(40):
        plan = source.to_plan(row, builder, torch.Generator().manual_seed(seed))
        texts = [_text(i.data) for i in plan if i.kind == "text"]
        kinds[len(texts), len(plan)] += 1
        assert plan[0].kind == "vae_image" and not plan[0].loss and plan[-1].loss
        for text in texts:
            assert text in {"make it red", "redden", "make it big", "make it red. make it big.", "redden. make it big."}
        if len(texts) == 2:  # the two-step chain: the intermediate target is generated, then entered clean
            assert [(i.kind, i.loss) for i in plan[3:6]] == [
                ("vae_image", True),
                ("vae_image", False),
                ("vit_image", False),
            ]
    # one step from 0 or from 1 (4 items), two joined steps (4 items), a two-step chain (8 items)
    assert set(kinds) == {(1, 4), (2, 8)} and kinds[1, 4] > kinds[2, 8] > 0


def test_llava_jsonl_reader(tmp_path, builder):
    (tmp_path / "img").mkdir()
    _pil(56, 28, 0).save(tmp_path / "img" / "a.png")
    _pil(28, 28, 1).save(tmp_path / "img" / "b.jpg")
    lines = [
        {
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}],
        },
        {
            "image": ["a.png", "b.jpg"],
            "conversations": [{"from": "human", "value": "<image><image> Diff?"}, {"from": "gpt", "value": "Size."}],
        },
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},  # no answer: skipped
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    source = LlavaJsonl(tmp_path / "data.jsonl", tmp_path / "img")
    rows = source.read_chunk(source.chunks()[0])
    assert len(rows) == 3
    g = torch.Generator()
    plan = source.to_plan(rows[0], builder, g)
    assert [(i.kind, i.loss) for i in plan] == [("vit_image", False), ("text", False), ("text", True)]
    assert plan[0].data.shape == (3, 28, 56) and _text(plan[1].data) == "What?" and _text(plan[2].data) == "A."
    plan = source.to_plan(rows[1], builder, g)
    assert [i.kind for i in plan] == ["vit_image", "vit_image", "text", "text"]
    assert source.to_plan(rows[2], builder, g) is None
    # The stream passes over skipped rows.
    stream = SourceStream(source, builder, shard=0, num_shards=1, seed=0)
    answers = Counter(_text(next(stream)[1][-1].data) for _ in range(6))
    assert answers == {"A.": 3, "Size.": 3}, "three epochs of the two rows with an answer"
    (tmp_path / "empty.jsonl").write_text(json.dumps(lines[2]) + "\n")
    with pytest.raises(ValueError, match="none of the 1 rows"):
        next(SourceStream(LlavaJsonl(tmp_path / "empty.jsonl", tmp_path), builder, 0, 1, seed=0))


# ----------------------------------------------------------------------------------------------
# Sharding, mixing, resume
# ----------------------------------------------------------------------------------------------


def _epoch_captions(stream: SourceStream) -> list[str]:
    return [_text(next(stream)[1][0].data) for _ in range(stream.num_rows)]


@pytest.mark.parametrize("num_shards", [1, 4, 8, 18])
def test_shards_partition_the_rows(tmp_path, builder, num_shards):
    """3 files x 2 row groups x 3 rows; 4 readers share row groups, 8 and 18 also cut them into rows."""
    source = T2IParquet(write_t2i(tmp_path / "t2i"))
    seen = [_epoch_captions(SourceStream(source, builder, shard, num_shards, seed=0)) for shard in range(num_shards)]
    flat = [caption for shard in seen for caption in shard]
    assert sorted(flat) == sorted(f"r{n}" for n in range(18)), "every row once over all readers"
    stream = SourceStream(source, builder, 0, num_shards, seed=0)
    first, second = _epoch_captions(stream), _epoch_captions(stream)
    assert sorted(first) == sorted(second) == sorted(seen[0]), "the next epoch reads the same shard again"
    if len(first) > 2:
        assert first != second, "each epoch draws a new order"
    with pytest.raises(ValueError, match="fewer than the 19 readers"):
        SourceStream(source, builder, 0, 19, seed=0)


def test_rank_and_worker_pick_the_shard(tmp_path, builder):
    source = T2IParquet(write_t2i(tmp_path / "t2i"))
    kwargs = dict(max_num_tokens=64, expected_num_tokens=8, max_num_tokens_per_sample=64)
    dataset = BagelPackedDataset([source], builder, small_config(), rank=1, world_size=2, **kwargs)
    assert dataset.state_dict()["shard"] == 1 and dataset.state_dict()["num_shards"] == 2
    loader = torch.utils.data.DataLoader(
        BagelPackedDataset([source], builder, small_config(), rank=1, world_size=2, **kwargs),
        batch_size=None,
        num_workers=2,
    )
    captions = Counter()
    for _, pack in zip(range(18), loader):
        ids = pack["packed_text_ids"].tolist()
        assert len(pack["sample_lens"]) == 1, "one t2i sample a pack: [bos caption eos] [start 4 latents end]"
        captions[_text(ids[1 : ids.index(11)])] += 1
    # readers 2 and 3 of 4 (rank 1's two workers) hold row groups 2, 3 and 6 .. 7: files 1 and 3
    expected = {f"r{n}" for group in (2, 3) for n in range(3 * group, 3 * group + 3)}
    assert set(captions) == expected and set(captions.values()) == {3}


def test_mixing_follows_the_weights(tmp_path, builder):
    def jsonl(name, answer):
        line = json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]})
        (tmp_path / name).write_text((line + "\n") * 5)
        return LlavaJsonl(tmp_path / name, tmp_path)

    sources = [jsonl("a.jsonl", "a"), jsonl("b.jsonl", "b"), jsonl("c.jsonl", "c")]
    dataset = BagelPackedDataset(sources, builder, small_config(), weights=[6, 3, 0], seed=1)
    samples = dataset.samples()
    counts = Counter(next(samples)[0][0] for _ in range(900))
    assert counts[2] == 0 and 0.6 < counts[0] / 900 < 0.73, counts
    keys = lambda seed: [
        next(s)[0]
        for s in [
            BagelPackedDataset(  # noqa: E731
                sources, builder, small_config(), weights=[6, 3, 0], seed=seed
            ).samples()
        ]
        for _ in range(40)
    ]
    assert keys(1) == keys(1) != keys(2), "the mixing is drawn from the seed"
    with pytest.raises(ValueError, match="weights"):
        BagelPackedDataset(sources, builder, small_config(), weights=[1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        BagelPackedDataset(sources, builder, small_config(), weights=[0, 0, 0])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        BagelPackedDataset(sources, builder, small_config(), weights=[1, -1, 1])
    with pytest.raises(TypeError, match=r"weights\[2\]"):  # a bool is no weight (it was taken as 1.0)
        BagelPackedDataset(sources, builder, small_config(), weights=[1, 1, True])


def _packs_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def _mixed_dataset(tmp_path, builder, **overrides):
    t2i = T2IParquet(write_t2i(tmp_path / "t2i", files=2, row_groups=2, rows=3))
    pq.write_table(
        pa.table(
            {
                "image_list": [[_png(32, 32, i), _png(32, 48, i + 1), _png(32, 32, i + 2)] for i in range(4)],
                "instruction_list": [[["up"], ["down", "left"]]] * 4,
            }
        ),
        tmp_path / "edit.parquet",
        row_group_size=2,
    )
    edit = EditParquet(tmp_path / "edit.parquet")
    config = small_config(text_cond_dropout_prob=0.3, vit_cond_dropout_prob=0.3, vae_cond_dropout_prob=0.3)
    kwargs = dict(
        weights=[2, 1],
        seed=5,
        max_num_tokens=48,
        expected_num_tokens=40,
        max_num_tokens_per_sample=48,
        prefer_buffer_before=20,
        max_buffer_size=2,
    )
    return lambda: BagelPackedDataset([t2i, edit], builder, config, **{**kwargs, **overrides})


def test_resume_in_process_continues_exactly(tmp_path, builder):
    make = _mixed_dataset(tmp_path, builder)
    reference = iter(make())
    expected = [next(reference) for _ in range(12)]
    first = make()
    packs = iter(first)
    for _ in range(5):
        next(packs)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = iter(resumed)
    assert all(_packs_equal(next(tail), want) for want in expected[5:])
    assert any(s != [0, 0, 0] for s in state["positions"])
    other_rank = _mixed_dataset(tmp_path / "other", builder, rank=1, world_size=2)()
    other_rank.load_state_dict(state)
    with pytest.raises(ValueError, match="another setup"):
        next(iter(other_rank))


def test_resume_with_stateful_dataloader_workers(tmp_path, builder):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    make = _mixed_dataset(tmp_path, builder, rank=0, world_size=2)
    loader = stateful.StatefulDataLoader(make(), batch_size=None, num_workers=2)
    stream = iter(loader)
    for _ in range(5):
        next(stream)
    state = loader.state_dict()
    expected = [next(stream) for _ in range(6)]
    again = stateful.StatefulDataLoader(make(), batch_size=None, num_workers=2)
    again.load_state_dict(state)
    got = iter(again)
    assert all(_packs_equal(next(got), want) for want in expected)
