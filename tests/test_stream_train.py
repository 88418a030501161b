"""Training from shards (data.stream=true): one shard read at a time, every record once per epoch, tar shards
carrying their own media, bad records named by shard, scratch space freed, and `mmalign shard` making the shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmalign.cli import app
from mmalign.config import ConfigError, check_recipe
from mmalign.data import stream as stream_module
from mmalign.data.stream import write_shards
from mmalign.train.loop import LMObjective, train
from test_train import losses, recipe


def records(shapes) -> list[dict]:
    return json.loads(Path(shapes["conversations"]).read_text())


def make_shards(shapes, out, fmt="tar", per_shard=7) -> str:
    write_shards(records(shapes), out / "shards", per_shard, fmt=fmt, media_folder=Path(shapes["images"]))
    return str(out / "shards")


def test_an_epoch_over_shards_reads_every_record_once_one_shard_at_a_time(base, shapes, tmp_path, monkeypatch):
    data = {"stream": True, "train": make_shards(shapes, tmp_path)}
    obj = LMObjective(recipe(base, shapes, tmp_path, batch_size=4, data=data))
    opened, real_open = [], stream_module.open_shard

    def open_shard(path, *args, **kwargs):
        assert len(opened) == len(closed), "a shard was opened while another was still open"
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    closed, real_close = [], stream_module.close_shard
    monkeypatch.setattr("mmalign.train.loop.open_shard", open_shard)
    monkeypatch.setattr("mmalign.train.loop.close_shard", lambda shard: (closed.append(1), real_close(shard)))
    state = {"epoch": 0, "cursor": 0, "seen": 0, "skipped": 0}
    stream = obj.batches(state, obj.cfg.train, print)
    ids = []
    while (batch := next(stream)) and state["epoch"] == 0:  # the batch that ends the loop is epoch 1's first
        ids += batch["ids"]
    assert sorted(ids) == sorted(r["id"] for r in records(shapes))  # 40 records in 6 shards of 7
    assert sorted(opened[:6]) == [f"train-{k:05d}.tar" for k in range(6)]
    assert obj.steps_per_epoch(4) == 6 * 2  # 7 records: a batch of 4 and one of 3 per shard; the last shard 5
    stream.close()
    assert not any((tmp_path / "run/.stream").rglob("*.png"))  # extracted media are gone


@pytest.mark.parametrize("fmt", ["tar", "jsonl"])
def test_a_stream_run_learns(base, shapes, tmp_path, fmt):
    data = {"stream": True, "train": make_shards(shapes, tmp_path, fmt=fmt)}
    summary = train(recipe(base, shapes, tmp_path, max_steps=20, batch_size=4, data=data))
    assert summary["skipped"] == 0
    run = losses(tmp_path / "run")
    assert sum(run[-3:]) < 0.8 * sum(run[:3]), run


def test_a_bad_record_in_a_shard_is_skipped_and_named_with_its_shard(base, shapes, tmp_path):
    recs = records(shapes)
    recs[3]["conversations"][1]["value"] = ""  # an empty answer: nothing to learn from
    recs[3]["conversations"] = recs[3]["conversations"][:1]  # a question without an answer
    write_shards(recs, tmp_path / "shards", 10, fmt="jsonl")
    data = {"stream": True, "train": str(tmp_path / "shards/*.jsonl")}
    summary = train(recipe(base, shapes, tmp_path, max_steps=10, batch_size=4, data=data))
    assert summary["skipped"] == 1
    skipped = [json.loads(line) for line in (tmp_path / "run/skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["id"] == "conv-3" and "train-00000.jsonl" in skipped[0]["error"]


def test_stream_refuses_train_fractions(base, shapes, tmp_path):
    with pytest.raises(ConfigError, match="train_fractions"):
        check_recipe(recipe(base, shapes, tmp_path, data={"stream": True, "train_fractions": [0.5]}))


def test_the_shard_command_writes_tar_shards_that_carry_their_media(shapes, tmp_path):
    cli = ["shard", shapes["conversations"], "--out", str(tmp_path / "s"), "--per-shard", "16"]
    done = CliRunner().invoke(app, [*cli, "--media-folder", shapes["images"]])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [f"train-0000{k}.tar" for k in range(3)]
    shard = stream_module.open_shard(tmp_path / "s/train-00001.tar", tmp_path / "scratch")
    assert [r["id"] for r in shard.records] == [r["id"] for r in records(shapes)[16:32]]
    assert all((shard.media_folder / r["image"]).is_file() for r in shard.records)

    missing = CliRunner().invoke(app, [*cli, "--media-folder", str(tmp_path)])  # the images are not there
    assert missing.exit_code == 2 and "conv-0" in missing.output


def test_each_shard_is_read_in_its_own_order_under_the_run_folder_and_the_next_epoch_starts_whole(
    base, shapes, tmp_path, monkeypatch
):
    from mmalign.data.stream import record_order, shard_order

    data = {"stream": True, "train": make_shards(shapes, tmp_path)}
    obj = LMObjective(recipe(base, shapes, tmp_path, batch_size=4, data=data))
    scratch, real_open = [], stream_module.open_shard

    def open_shard(path, scratch_root, *args):
        scratch.append(scratch_root)
        return real_open(path, scratch_root, *args)

    monkeypatch.setattr("mmalign.train.loop.open_shard", open_shard)
    state = {"epoch": 0, "cursor": 0, "seen": 0, "skipped": 0}
    stream = obj.batches(state, obj.cfg.train, print)
    ids = {0: [], 1: []}
    while len(ids[1]) < 40:  # two whole epochs of the 40 records
        batch = next(stream)
        if state["epoch"] == 1 and not ids[1]:  # the first batch of the second epoch: its position starts over
            assert (state["cursor"], state["shard"]) == (1, 0)
        ids[state["epoch"]] += batch["ids"]
    stream.close()
    assert set(scratch) == {tmp_path / "run" / ".stream" / "rank0"}
    recs, seed = records(shapes), obj.cfg.train.seed
    for epoch in (0, 1):
        # Shards in the epoch's order; within shard k, record_order(k): its own order, not one shared by all shards.
        expected = []
        for k in shard_order(6, seed, epoch):
            shard = recs[7 * k : 7 * k + 7]
            expected += [shard[i]["id"] for i in record_order(len(shard), seed, epoch, k)]
        assert ids[epoch] == expected, epoch
