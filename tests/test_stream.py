"""Sharded data: which shard files a spec names, seeded orders, JSONL and tar shards written and read back, and the
errors that name the file and line or member."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from mmalign.data import stream
from mmalign.data.processor import _media_keys
from mmalign.data.stream import (
    Shard,
    close_shard,
    count_records,
    media_paths,
    member_key,
    open_shard,
    record_order,
    rename_media,
    shard_order,
    shard_paths,
    write_shards,
)


def record(i: int, **media) -> dict:
    turns = [{"from": "human", "value": f"<image>\nquestion {i}"}, {"from": "gpt", "value": f"answer {i}"}]
    return {"id": f"r{i}", "conversations": turns, **media}


def make_tar(path: Path, members: dict[str, bytes | dict]) -> Path:
    """A hand-built tar: member name -> bytes, or a dict written as JSON."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            data = json.dumps(data).encode() if isinstance(data, dict) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- shard_paths


@pytest.fixture
def shard_dir(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("train-00001.tar", "train-00000.tar", "train-00000.jsonl", "notes.txt"):
        (folder / name).write_text("")
    (folder / "sub").mkdir()
    (folder / "sub" / "train-00002.tar").write_text("")
    return folder


def test_shard_paths_folder_takes_its_shards_sorted(shard_dir):
    assert shard_paths(str(shard_dir)) == [
        shard_dir / "train-00000.jsonl",
        shard_dir / "train-00000.tar",
        shard_dir / "train-00001.tar",
    ]


def test_shard_paths_glob_and_list_keep_entry_order_and_drop_duplicates(shard_dir):
    assert shard_paths(str(shard_dir / "train-*.tar")) == [shard_dir / "train-00000.tar", shard_dir / "train-00001.tar"]
    spec = [str(shard_dir / "sub" / "train-00002.tar"), str(shard_dir / "train-0000*"), str(shard_dir)]
    assert shard_paths(spec) == [
        shard_dir / "sub" / "train-00002.tar",
        shard_dir / "train-00000.jsonl",
        shard_dir / "train-00000.tar",
        shard_dir / "train-00001.tar",
    ]


def test_shard_paths_errors_name_the_entry_or_file(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="val-\\*.tar"):
        shard_paths([str(shard_dir), str(shard_dir / "val-*.tar")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        shard_paths(str(empty))
    with pytest.raises(ValueError, match="notes.txt"):
        shard_paths(str(shard_dir / "*"))
    with pytest.raises(ValueError, match="notes.txt"):
        shard_paths([str(shard_dir / "notes.txt")])


# ---------------------------------------------------------------- orders


@pytest.mark.parametrize("order", [lambda *a: shard_order(50, *a[:2]), lambda *a: record_order(50, *a)])
def test_orders_are_seeded_permutations(order):
    base = order(3, 1, 4)
    assert sorted(base) == list(range(50)) and base != list(range(50))
    assert order(3, 1, 4) == base
    assert order(3, 2, 4) != base  # another epoch
    assert order(4, 1, 4) != base  # another seed


def test_record_order_differs_per_shard():
    assert record_order(50, 0, 0, 0) != record_order(50, 0, 0, 1)
    assert record_order(50, 0, 0, 1) != shard_order(50, 0, 0)
    assert record_order(0, 0, 0, 0) == [] and shard_order(0, 0, 0) == []


# ---------------------------------------------------------------- JSONL shards


def test_jsonl_shards_round_trip_in_order(tmp_path):
    records = [record(i, image=f"img/{i}.png") for i in range(7)]
    paths = write_shards(records, tmp_path / "out", per_shard=3)
    assert [p.name for p in paths] == ["train-00000.jsonl", "train-00001.jsonl", "train-00002.jsonl"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]  # no .tmp left
    shards = [open_shard(p, tmp_path / "scratch", media_folder=tmp_path / "media") for p in paths]
    assert [len(s.records) for s in shards] == [3, 3, 1]
    assert [r for s in shards for r in s.records] == records
    assert all(s.media_folder == tmp_path / "media" and s.scratch is None for s in shards)
    assert count_records(paths) == 7
    assert shard_paths(str(tmp_path / "out")) == paths


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record(0)) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=f"{path}:3: not valid JSON"):
        open_shard(path, tmp_path / "scratch")
    path.write_text(json.dumps(record(0)) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=f"{path}:2: expected a JSON object, got list"):
        open_shard(path, tmp_path / "scratch")


def test_count_records_skips_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1}\n\n  \n{"id": 2}\n')
    assert count_records([path]) == 2


# ---------------------------------------------------------------- tar shards


@pytest.fixture
def media(tmp_path):
    """Media files with distinct bytes, by their path relative to the media folder."""
    folder = tmp_path / "media"
    files = {"img/a.png": b"png-bytes-a", "img/b.png": b"png-bytes-b", "img/c.jpg": b"jpg-bytes-c"}
    if "audio" in _media_keys():
        files["snd/x.wav"] = b"wav-bytes-x"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def tar_records(media: Path) -> list[dict]:
    records = [
        record(0, image="img/a.png"),
        record(1, image=["img/b.png", "img/c.jpg"]),
        record(2),
        {
            "id": "doc",
            "text_list": ["one", "two"],
            "image_info": [{"image_name": "img/c.jpg", "matched_text_index": 1}],
        },
        record(4, image="img/a.png"),
    ]
    if (media / "snd" / "x.wav").exists():
        records.append(record(5, audio="snd/x.wav", image=["img/b.png"]))
    return records


def test_tar_shards_carry_their_media(tmp_path, media):
    records = tar_records(media)
    originals = json.loads(json.dumps(records))
    paths = write_shards(records, tmp_path / "out", per_shard=2, fmt="tar", media_folder=media, prefix="mm")
    assert [p.name for p in paths] == [f"mm-{k:05d}.tar" for k in range((len(records) + 1) // 2)]
    assert records == originals  # the caller's records are not rewritten
    assert count_records(paths) == len(records)
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == ["000000.json", "000000.0.png", "000001.json", "000001.0.png", "000001.1.jpg"]

    scratch_root = tmp_path / "scratch"
    read: list[dict] = []
    for path in paths:
        shard = open_shard(path, scratch_root, media_folder=tmp_path / "ignored")
        assert shard.scratch == scratch_root / path.stem and shard.media_folder == shard.scratch
        for got in shard.records:
            want = originals[len(read)]
            assert [(shard.media_folder / p).read_bytes() for p in media_paths(got)] == [
                (media / p).read_bytes() for p in media_paths(want)
            ]
            assert all(not p.startswith("img/") for p in media_paths(got))  # member names, not the original paths
            assert rename_media(got, lambda p: "x") == rename_media(want, lambda p: "x")  # all else, and str/list
            read.append(got)
        close_shard(shard)
        assert not shard.scratch.exists()
    assert len(read) == len(records)
    assert read[1]["image"] == ["000001.0.png", "000001.1.jpg"] and read[0]["image"] == "000000.0.png"
    assert read[3]["image_info"][0]["image_name"] == "000003.0.jpg"


def test_open_tar_clears_a_leftover_scratch_folder(tmp_path):
    path = make_tar(tmp_path / "s.tar", {"000000.json": record(0)})
    (tmp_path / "scratch" / "s").mkdir(parents=True)
    (tmp_path / "scratch" / "s" / "stale.png").write_bytes(b"old")
    shard = open_shard(path, tmp_path / "scratch")
    assert files_under(shard.scratch) == {"000000.json"}
    assert shard.records == [record(0)]
    close_shard(shard)
    close_shard(Shard(path=path, records=[], media_folder=None, scratch=None))  # JSONL: nothing to remove


def test_tar_members_in_folders_and_dot_slash_names(tmp_path):
    path = make_tar(
        tmp_path / "s.tar",
        {"./s/000001.json": record(1, image="s/000001.png"), "./s/000001.png": b"p", "s/000000.json": record(0)},
    )
    shard = open_shard(path, tmp_path / "scratch")
    assert [r["id"] for r in shard.records] == ["r1", "r0"]  # member order of the .json members
    assert (shard.media_folder / shard.records[0]["image"]).read_bytes() == b"p"
    close_shard(shard)


@pytest.mark.parametrize(
    "name, key",
    [("s/000001.json", ("s/000001", "json")), ("000001.0.png", ("000001", "0.png")), ("./a/b.c.d", ("a/b", "c.d"))],
)
def test_member_key(name, key):
    assert member_key(name) == key


@pytest.mark.parametrize(
    "members, message",
    [
        ({"000000.json": record(0), "000001.png": b"p"}, "'000001.png': key '000001' has 0 .json members"),
        ({"000000.json": record(0, image="000000.0.png")}, "'000000.json': media '000000.0.png' is not a file"),
        (
            {"000000.json": record(0, image=["000000.0.png", "x.png"]), "000000.0.png": b"p"},
            "'000000.json': media 'x.png'",
        ),
        ({"000000.json": b"[1]"}, "'000000.json': expected a JSON object, got list"),
        ({"000000.json": b"{oops"}, "'000000.json': not valid JSON"),
    ],
)
def test_tar_errors_name_the_tar_and_member(tmp_path, members, message):
    path = make_tar(tmp_path / "bad.tar", members)
    with pytest.raises(ValueError, match=re.escape(f"{path}: member {message}")):
        open_shard(path, tmp_path / "scratch")
    assert not (tmp_path / "scratch" / "bad").exists()


def test_tar_with_two_json_members_for_a_key(tmp_path):
    path = make_tar(tmp_path / "bad.tar", {"000000.json": record(0)})
    with tarfile.open(path, "a") as tar:  # the same name again: a tar allows it
        data = json.dumps(record(1)).encode()
        info = tarfile.TarInfo("000000.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="key '000000' has 2 .json members"):
        open_shard(path, tmp_path / "scratch")


def test_not_a_tar_names_the_file(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match=f"{path}: not a readable tar"):
        open_shard(path, tmp_path / "scratch")


@pytest.mark.parametrize("name", ["../evil.json", "a/../../evil.json", "ABSOLUTE"])
def test_tar_members_outside_the_folder_are_refused(tmp_path, name):
    box = tmp_path / "box"
    box.mkdir()
    name = str(tmp_path / "evil.json") if name == "ABSOLUTE" else name
    path = make_tar(box / "s.tar", {"000000.json": record(0), name: record(1)})
    with pytest.raises(ValueError, match="would extract outside"):
        open_shard(path, box / "scratch")
    assert files_under(tmp_path) == {"box/s.tar"}


@pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="this Python's tarfile has no extraction filters")
def test_data_filter_guards_extraction_too(tmp_path, monkeypatch):
    box = tmp_path / "box"
    box.mkdir()
    path = make_tar(box / "s.tar", {"000000.json": record(0), "../evil.json": record(1)})
    monkeypatch.setattr(stream, "_safe_name", lambda name: True)  # past the name check: the filter must refuse
    with pytest.raises(ValueError, match="'../evil.json' refused on extraction"):
        open_shard(path, box / "scratch")
    assert files_under(tmp_path) == {"box/s.tar"}


# ---------------------------------------------------------------- write_shards errors


def test_write_shards_missing_media_names_the_record(tmp_path, media):
    records = [record(0, image="img/a.png"), record(1, image=["img/b.png", "img/gone.png"])]
    records[1]["id"] = "r-missing"
    with pytest.raises(FileNotFoundError, match="record r-missing: .*img/gone.png"):
        write_shards(records, tmp_path / "out", per_shard=5, fmt="tar", media_folder=media)
    assert list((tmp_path / "out").iterdir()) == []  # no partial shard, no .tmp
    del records[1]["id"]
    with pytest.raises(FileNotFoundError, match="record 1: "):
        write_shards(records, tmp_path / "out", per_shard=5, fmt="tar", media_folder=media)


def test_write_shards_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="per_shard must be at least 1"):
        write_shards([record(0)], tmp_path, per_shard=0)
    with pytest.raises(ValueError, match="unknown shard format 'zip'"):
        write_shards([record(0)], tmp_path, per_shard=1, fmt="zip")
    with pytest.raises(ValueError, match="record 1: expected a JSON object"):
        write_shards([record(0), ["x"]], tmp_path, per_shard=1)
    assert write_shards([], tmp_path / "none", per_shard=1) == []
