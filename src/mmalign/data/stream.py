"""Training data larger than memory: LLaVA records split into shards, read one shard at a time.

A shard is a JSONL file (records only; media stay in the recipe's media folder) or a WebDataset-style tar that
carries its media: members grouped by key (`000001.json` is the record, `000001.0.png` its first media item). The
shard order of an epoch and the record order within a shard are pure functions of (seed, epoch, shard), so a run
resumes exactly from (epoch, shard position, batch cursor). A tar is extracted into a scratch folder while its
shard is read and removed after (`open_shard`, `close_shard`); `write_shards` makes shards from a LLaVA list.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import torch

from mmalign.data.processor import _media_keys

SHARD_SUFFIXES = (".jsonl", ".tar")
SHARD_FORMATS = ("jsonl", "tar")

# ---------------------------------------------------------------- which shards, in which order


def shard_paths(spec: str | list[str]) -> list[Path]:
    """The shard files named by `spec`: each entry a file, a folder (its `*.jsonl` and `*.tar`, not recursive) or a
    glob pattern. Sorted within an entry, entries in the given order, a file named twice kept at its first place, so
    the list (and with it a shard's index, which seeds its record order) is stable across runs."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    out: list[Path] = []
    seen: set[Path] = set()
    for entry in entries:
        for path in _entry_files(str(entry)):
            if path.suffix not in SHARD_SUFFIXES:
                raise ValueError(f"{path}: not a shard (expected one of {', '.join(SHARD_SUFFIXES)})")
            if path.resolve() not in seen:
                seen.add(path.resolve())
                out.append(path)
    return out


def _entry_files(entry: str) -> list[Path]:
    """The files one entry of a shard spec names; an entry that names none is an error (a typo, an empty folder)."""
    path = Path(entry)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SHARD_SUFFIXES)
    elif path.is_file():
        found = [path]
    else:
        found = sorted(Path(p) for p in glob.glob(entry) if Path(p).is_file())
    if not found:
        raise FileNotFoundError(f"no shard files match {entry!r}")
    return found


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The shuffled shard order of one epoch, seeded like `epoch_order`, so resume replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_shards, generator=g).tolist()


def record_order(n_records: int, seed: int, epoch: int, shard: int) -> list[int]:
    """The shuffled record order within one shard. `shard` is the shard's index in `shard_paths` (not its place in
    the epoch's order), so each shard gets its own order every epoch and a resumed run draws the same one."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7919 + shard)
    return torch.randperm(n_records, generator=g).tolist()


# ---------------------------------------------------------------- reading a shard


@dataclass
class Shard:
    path: Path
    records: list[dict]
    media_folder: Path | None  # where the records' media paths resolve
    scratch: Path | None  # the folder a tar was extracted to (removed by close_shard); None for JSONL


def open_shard(path: Path, scratch_root: Path, media_folder: Path | None = None) -> Shard:
    """A shard's records and the folder their media resolve against: `media_folder` for JSONL (media live outside
    the shard), the tar's extraction folder `scratch_root/<stem>` for a tar. Malformed shards fail here, naming the
    file and line or member; a missing media file of a JSONL shard is left to the processor, which reports it per
    sample."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return Shard(path=path, records=read_jsonl(path), media_folder=media_folder, scratch=None)
    if path.suffix == ".tar":
        return _open_tar(path, Path(scratch_root) / path.stem)
    raise ValueError(f"{path}: not a shard (expected one of {', '.join(SHARD_SUFFIXES)})")


def close_shard(shard: Shard) -> None:
    """Free the disk a tar shard took when extracted; nothing to do for JSONL."""
    if shard.scratch is not None:
        shutil.rmtree(shard.scratch, ignore_errors=True)


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-blank line; a bad line fails naming `file:line`."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                records.append(_json_object(line, f"{path}:{line_no}"))
    return records


def _json_object(text: str | bytes, where: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def member_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member, WebDataset style: `s/000001.0.png` -> (`s/000001`, `0.png`). A leading
    `./` is dropped, so tars made with `tar -C dir .` group the same way."""
    name = _plain_name(name)
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _plain_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _safe_name(name: str) -> bool:
    """A member that extracts inside the scratch folder: relative, no `..` (checked here so the error names the
    member, and so a record can never point outside the folder by naming an absolute member)."""
    pure = PurePosixPath(name)
    return bool(name) and not pure.is_absolute() and ".." not in pure.parts


def _open_tar(path: Path, scratch: Path) -> Shard:
    try:
        with tarfile.open(path) as tar:
            files = [m for m in tar.getmembers() if m.isfile()]
            records = _tar_records(path, tar, files)
            shutil.rmtree(scratch, ignore_errors=True)  # a leftover of an interrupted run
            scratch.mkdir(parents=True)
            _extract(path, tar, files, scratch)
    except tarfile.TarError as err:
        raise ValueError(f"{path}: not a readable tar ({err})") from err
    return Shard(path=path, records=records, media_folder=scratch, scratch=scratch)


def _tar_records(path: Path, tar: tarfile.TarFile, files: list[tarfile.TarInfo]) -> list[dict]:
    """The records of a tar in the order of their .json members, each checked: one .json per key, a JSON object,
    media fields that name files of this tar."""
    names = {_plain_name(m.name) for m in files}
    by_key: dict[str, list[tarfile.TarInfo]] = {}
    for m in files:
        if not _safe_name(m.name):
            raise ValueError(f"{path}: member {m.name!r} would extract outside its folder (absolute or with ..)")
        by_key.setdefault(member_key(m.name)[0], []).append(m)
    for key, members in by_key.items():
        n_json = sum(member_key(m.name)[1] == "json" for m in members)
        if n_json != 1:
            raise ValueError(f"{path}: member {members[0].name!r}: key {key!r} has {n_json} .json members, needs one")
    records = []
    for m in files:
        if member_key(m.name)[1] != "json":
            continue
        where = f"{path}: member {m.name!r}"
        record = _json_object(tar.extractfile(m).read(), where)
        missing = [p for p in media_paths(record) if _plain_name(p) not in names]
        if missing:
            raise ValueError(f"{where}: media {missing[0]!r} is not a file in the tar")
        records.append(record)
    return records


def _extract(path: Path, tar: tarfile.TarFile, files: list[tarfile.TarInfo], scratch: Path) -> None:
    """Regular files only, under the `data` filter where this Python has it (it refuses anything that would land
    outside the folder); a refused member fails naming it. Any failure (a refusal, a full disk) removes what was
    extracted, so no half-extracted shard is left behind."""
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        tar.extractall(scratch, members=files, **kwargs)
    except BaseException as err:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(err, tarfile.TarError):
            member = getattr(getattr(err, "tarinfo", None), "name", "?")
            raise ValueError(f"{path}: member {member!r} refused on extraction ({err})") from err
        raise


# ---------------------------------------------------------------- media fields of a record


def rename_media(record: dict, rename: Callable[[str], str]) -> dict:
    """A copy of `record` with every media path passed through `rename`, in a fixed order: the modality keys
    (`image`, `audio`, ...; a path or a list of paths, form kept), then an interleaved document's
    `image_info[].image_name`. Values of the wrong type are left for the processor to report."""
    out = dict(record)
    for key in _media_keys():
        value = record.get(key)
        if isinstance(value, str):
            out[key] = rename(value)
        elif isinstance(value, list):
            out[key] = [rename(v) if isinstance(v, str) else v for v in value]
    if "text_list" in record and isinstance(record.get("image_info"), list):
        out["image_info"] = [
            {**info, "image_name": rename(info["image_name"])}
            if isinstance(info, dict) and isinstance(info.get("image_name"), str)
            else info
            for info in record["image_info"]
        ]
    return out


def media_paths(record: dict) -> list[str]:
    """Every media path a record references, in `rename_media`'s order."""
    paths: list[str] = []
    rename_media(record, lambda p: paths.append(p) or p)
    return paths


# ---------------------------------------------------------------- making shards


def write_shards(
    records: list[dict],
    out_dir: Path,
    per_shard: int,
    *,
    fmt: str = "jsonl",
    media_folder: Path | None = None,
    prefix: str = "train",
) -> list[Path]:
    """Split a LLaVA record list into `out_dir/{prefix}-{k:05d}.{fmt}`, `per_shard` records each in the given order
    (the last may be shorter). A tar shard carries the media too, read from `media_folder`: record i becomes member
    `{i:06d}.json` and its j-th media item `{i:06d}.{j}{suffix}`, with the record's media paths rewritten to those
    names. Each shard is written to a .tmp file and renamed, so a shard on disk is always whole."""
    if per_shard < 1:
        raise ValueError(f"per_shard must be at least 1, got {per_shard}")
    if fmt not in SHARD_FORMATS:
        raise ValueError(f"unknown shard format {fmt!r} (expected one of {', '.join(SHARD_FORMATS)})")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {i}: expected a JSON object, got {type(record).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, start in enumerate(range(0, len(records), per_shard)):
        target = out_dir / f"{prefix}-{k:05d}.{fmt}"
        chunk = list(enumerate(records[start : start + per_shard], start=start))
        if fmt == "jsonl":
            _write_atomic(target, partial(_write_jsonl, chunk=chunk))
        else:
            folder = Path(media_folder) if media_folder is not None else Path(".")
            _write_atomic(target, partial(_write_tar, chunk=chunk, media_folder=folder))
        paths.append(target)
    return paths


def _write_atomic(target: Path, write: Callable[[BinaryIO], None]) -> None:
    tmp = target.with_name(target.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_jsonl(f: BinaryIO, chunk: list[tuple[int, dict]]) -> None:
    for _, record in chunk:
        f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")


def _write_tar(f: BinaryIO, chunk: list[tuple[int, dict]], media_folder: Path) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, record in chunk:
            sources: list[tuple[str, Path]] = []

            def rename(source: str, i: int = i, sources: list = sources) -> str:
                name = f"{i:06d}.{len(sources)}{PurePosixPath(source).suffix}"
                sources.append((name, media_folder / source))
                return name

            packed = rename_media(record, rename)
            for _, file in sources:
                if not file.is_file():
                    raise FileNotFoundError(f"record {record.get('id', i)}: media file not found: {file}")
            data = json.dumps(packed, ensure_ascii=False).encode("utf-8")
            _add_member(tar, f"{i:06d}.json", io.BytesIO(data), len(data))
            for name, file in sources:
                with open(file, "rb") as src:
                    _add_member(tar, name, src, os.fstat(src.fileno()).st_size)


def _add_member(tar: tarfile.TarFile, name: str, data: BinaryIO, size: int) -> None:
    """A regular-file member with fixed metadata (no owner, mtime 0), so the same records make the same tar; a
    media file that is a symlink goes in as the file it points to, since open_shard extracts regular files only."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    tar.addfile(info, data)


# ---------------------------------------------------------------- size


def count_records(paths: list[Path]) -> int:
    """How many records the shards hold, without extracting media: non-blank lines of a JSONL shard, .json
    members of a tar (counted as `open_shard` groups them)."""
    total = 0
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                total += sum(1 for line in f if line.strip())
        elif path.suffix == ".tar":
            with tarfile.open(path) as tar:
                total += sum(1 for m in tar.getmembers() if m.isfile() and member_key(m.name)[1] == "json")
        else:
            raise ValueError(f"{path}: not a shard (expected one of {', '.join(SHARD_SUFFIXES)})")
    return total
