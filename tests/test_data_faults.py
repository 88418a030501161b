"""Bad input fails with a message naming the sample (or file) and the problem, and never as another exception:
misspelled keys, unanswered last turns, broken data files, media over data.limits, and random corrupted records."""

from __future__ import annotations

import functools
import json
import re
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer

from helpers import image_processor
from mmalign.config import ConfigError, DataConfig, MediaLimits, apply_overrides, from_dict
from mmalign.constants import IGNORE_INDEX
from mmalign.data.dataset import ConversationDataset
from mmalign.data.processor import Conversation, SampleError, parse_record, processor_for, read_records
from mmalign.modalities import MediaError, get_modality
from mmalign.modalities.audio import load_audio
from mmalign.modalities.base import current_limits, set_limits
from mmalign.modalities.image import load_image
from mmalign.modalities.point import load_point, save_ply
from mmalign.modalities.video import load_video, save_gif, synth_video

N_IMG, SIZE = 4, 16
TURNS = [{"from": "human", "value": "<image>\nwhat color is it ?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture(scope="module")
def tok(shapes):
    return AutoTokenizer.from_pretrained(shapes["tokenizer"])


@pytest.fixture(scope="module")
def proc(tok):
    return image_processor(tok, tokens_per_image=N_IMG, image_size=SIZE)


@pytest.fixture(autouse=True)
def default_limits():
    """Every test starts and ends with the default media limits (set_limits is process-wide)."""
    set_limits(None)
    yield
    set_limits(None)


# ---------------------------------------------------------------------------------- 1. the conversations key
@pytest.mark.parametrize("key", ["conversation", "conversatons", "Conversations"])
def test_a_misspelled_conversations_key_is_named(key):
    record = {"id": "r1", "image": "a.png", key: TURNS}
    with pytest.raises(SampleError) as err:
        parse_record(record, 0)
    assert str(err.value) == f'sample r1: no "conversations" key (found "{key}": did you mean conversations?)'


def test_a_missing_conversations_key_is_named_and_an_empty_list_stays_empty():
    with pytest.raises(SampleError) as err:
        parse_record({"id": "r2", "image": "a.png", "caption": "x"}, 0)
    assert str(err.value) == 'sample r2: no "conversations" key'
    with pytest.raises(SampleError, match="^sample r3: empty conversation$"):
        parse_record({"id": "r3", "conversations": []}, 0)


# ---------------------------------------------------------------------------------- 2. an unanswered last turn
ASKED = {"id": "q1", "image": "a.png", "conversations": [*TURNS, {"from": "human", "value": "and its size ?"}]}


def test_training_refuses_a_conversation_ending_on_a_human_turn(proc, tmp_path):
    with pytest.raises(SampleError, match="^sample q1: ends with a human turn that has no gpt answer$"):
        proc.tokenize(parse_record(ASKED, 0))
    (tmp_path / "d.json").write_text(json.dumps([ASKED]))
    item = ConversationDataset(tmp_path / "d.json", tmp_path, proc)[0]
    assert item == {"id": "q1", "error": "sample q1: ends with a human turn that has no gpt answer"}


def test_a_prompt_may_still_end_on_a_human_turn(proc, tok):
    """Evaluation and generation ask the last question: parsing and prompt_ids accept it."""
    ids = proc.prompt_ids(parse_record(ASKED, 0))
    assert tok.convert_ids_to_tokens(ids[-1]) == "<assistant>"


def test_a_chat_template_that_refuses_a_conversation_names_the_sample(tok):
    """Real templates (Llama 2, Mistral) raise_exception on roles that do not alternate: a bad sample, not a crash."""
    strict = AutoTokenizer.from_pretrained(tok.name_or_path)
    strict.chat_template = "{% if messages|length > 2 %}{{ raise_exception('roles must alternate') }}{% endif %}x"
    record = {"id": "t1", "conversations": [{"from": "human", "value": "a"}, *TURNS[1:] * 2]}
    proc = image_processor(strict, tokens_per_image=N_IMG, image_size=SIZE)
    with pytest.raises(SampleError, match="^sample t1: the chat template refused the conversation: roles must alt"):
        proc.tokenize(parse_record(record, 0))
    prompt = record | {"conversations": [*record["conversations"], {"from": "human", "value": "and now ?"}]}
    with pytest.raises(SampleError, match="^sample t1: the chat template refused the conversation: roles must alt"):
        proc.prompt_ids(parse_record(prompt, 0))


def test_a_prompt_without_a_user_turn_names_the_sample(proc):
    answers_only = Conversation(id="a1", media={}, messages=[{"role": "assistant", "content": "red"}])
    with pytest.raises(SampleError, match="^sample a1: no user turn to answer$"):
        proc.prompt_ids(answers_only)


# ---------------------------------------------------------------------------------- 3. broken data files
def test_a_broken_json_file_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b" "conversations": []}\n]')
    with pytest.raises(ValueError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}: not valid JSON at line 3 column 14 (Expecting ',' delimiter); a LLaVA file is a JSON list of "
        "records, or JSONL with one record per line"
    )


def test_a_truncated_json_file_and_jsonl_named_json_say_so(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[{"id": "a", "conversations": [{"from": "human", "val')
    with pytest.raises(ValueError, match=r"cut\.json: not valid JSON at line 1 column \d+ \(Unterminated string"):
        read_records(path)
    path = tmp_path / "lines.json"
    path.write_text('{"id": "a"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"lines\.json: not valid JSON at line 2 column 1 \(Extra data\).*is it JSONL"):
        read_records(path)


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": "b", }\n{"id": "c"}\n')
    with pytest.raises(ValueError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}: line 3 is not valid JSON (Expecting property name")
    assert str(err.value).endswith("; a JSONL file holds one JSON record per line")


def test_a_json_file_that_is_not_a_list_keeps_its_error(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"id": "a", "conversations": TURNS}))
    with pytest.raises(ValueError, match=r"one\.json: expected a JSON list of samples"):
        read_records(path)


# ---------------------------------------------------------------------------------- 4. media limits
def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "width, height, claimed",
    [
        (30000, 30000, "900000000 pixels"),  # past PIL's own guard, which refuses it inside Image.open
        (10000, 10000, "10000x10000 pixels"),  # past PIL's warning, under its error
        (8000, 8000, "8000x8000 pixels"),  # under PIL's guard, over ours
    ],
)
def test_an_image_over_the_pixel_limit_fails_from_its_header(tmp_path, recwarn, width, height, claimed):
    path = tmp_path / "photo.png"
    path.write_bytes(png_header(width, height))
    with pytest.raises(MediaError) as err:
        load_image(path)
    # Decoding would have failed on the missing pixel data ("unreadable image"): the header decided.
    assert str(err.value) == (
        f"{path}: {claimed} exceed data.limits.max_image_pixels=40000000; raise the limit if this input is wanted"
    )
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def fake_model(image_size: int = SIZE):
    """What processor_for reads from a model, for one image modality."""
    encoder = SimpleNamespace(image_size=image_size, mean=(0.5,) * 3, std=(0.5,) * 3)
    return SimpleNamespace(
        modalities=["image"],
        media_token_ids={"image": 4},
        tokens_per_item=lambda m: N_IMG,
        encoders={"image": encoder},
    )


def test_processor_for_applies_data_limits_and_the_sample_is_named(tok, tmp_path):
    Image.new("RGB", (20, 10), "red").save(tmp_path / "small.png")
    limits = apply_overrides(DataConfig(), ["limits.max_image_pixels=199"]).limits
    proc = processor_for(fake_model(), tok, DataConfig(limits=limits))
    assert current_limits().max_image_pixels == 199
    conv = Conversation(id="s1", media={"image": ["small.png"]}, messages=[])
    with pytest.raises(
        SampleError, match=r"^sample s1: .*small\.png: 20x10 pixels exceed data\.limits\.max_image_pixels=199;"
    ):
        proc.media(conv, tmp_path)
    processor_for(fake_model(), tok, DataConfig())
    assert proc.media(conv, tmp_path)["image"].shape == (1, 3, SIZE, SIZE)  # the defaults are back


def test_limits_are_config_keys_with_ranges():
    assert DataConfig().limits == MediaLimits(40_000_000, 600.0, 1024, 1_000_000)
    with pytest.raises(ConfigError, match="limits.max_points=0: must be >= 1"):
        from_dict(DataConfig, {"limits": {"max_points": 0}})
    with pytest.raises(KeyError, match="limits.max_pixels"):
        from_dict(DataConfig, {"limits": {"max_pixels": 5}})


def test_audio_over_the_seconds_limit_fails_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "clip.wav"
    soundfile.write(path, np.zeros(16000, np.float32), 8000, subtype="PCM_16")  # 2 seconds
    assert load_audio(path).shape == (16000,)
    set_limits(MediaLimits(max_audio_seconds=1.5))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the samples were decoded")

    monkeypatch.setattr(soundfile.SoundFile, "read", no_decoding)
    with pytest.raises(MediaError) as err:
        load_audio(path)
    assert str(err.value) == (
        f"{path}: 2.0 seconds of audio exceed data.limits.max_audio_seconds=1.5; "
        "raise the limit if this input is wanted"
    )


@pytest.mark.parametrize("suffix", [".ply", ".npy"])
def test_a_point_cloud_over_the_points_limit_is_refused(tmp_path, suffix):
    path = tmp_path / f"cloud{suffix}"
    points = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    save_ply(points, path) if suffix == ".ply" else np.save(path, points)
    assert load_point(path).shape == (50, 3)
    set_limits(MediaLimits(max_points=10))
    with pytest.raises(MediaError, match=rf"^{path}: 50 points exceed data\.limits\.max_points=10;"):
        load_point(path)


def test_a_video_over_the_frames_limit_stops_decoding(tmp_path):
    import random

    path = tmp_path / "clip.gif"
    save_gif(synth_video(random.Random(0))[0], path)  # 8 frames
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"f{i}.png")
    assert load_video(path).shape[0] == 8 and load_video(folder).shape[0] == 5
    set_limits(MediaLimits(max_video_frames=3))
    with pytest.raises(MediaError, match=rf"^{path}: at least 4 frames exceed data\.limits\.max_video_frames=3;"):
        load_video(path)
    with pytest.raises(MediaError, match=rf"^{folder}: 5 frames exceed data\.limits\.max_video_frames=3;"):
        load_video(folder)


@pytest.mark.parametrize("modality", ["image", "audio", "video", "point", "depth", "imu", "signal"])
def test_an_absurdly_long_media_path_is_a_media_error(tmp_path, modality):
    """pathlib raises OSError (not False) from is_file() for a name the OS refuses; it must not escape a loader."""
    with pytest.raises(MediaError, match=r" path refused by the OS \(File name too long\): .*\(\d+ characters\)"):
        get_modality(modality).load(tmp_path / ("x" * 5000))


# ---------------------------------------------------------------------------------- 5. random corrupted records
# A valid record (a few question-answer turns, maybe an image) with up to three corruptions applied, or plain junk.
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
WORDS = ["what color", "red", "circle", "?", "\n", "مرحبا بالعالم", "שלום", "🙂🚀", "é", "\u200f", "<image>", "<audio>"]
TEXT = st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join),
    st.text(max_size=30),
    st.builds(lambda part, n: part * n, st.text(min_size=1, max_size=4), st.integers(1000, 5000)),  # up to ~20k
)
PLAIN = st.lists(st.sampled_from(WORDS[:9]), min_size=1, max_size=6).map(" ".join)  # no placeholders
IMAGE = st.sampled_from(["ok.png", ["ok.png"], ["ok.png", "ok.png"], "missing.png", "", [], "x" * 5000]) | JUNK
SPEAKER = st.sampled_from(["human", "gpt", "user", "assistant", "system", "bot", "", "GPT"]) | JUNK
TURN = st.fixed_dictionaries({}, optional={"from": SPEAKER, "value": TEXT | JUNK, "extra": JUNK}) | JUNK
KEYS = st.sampled_from(["id", "conversations", "image", "text_list", "image_info"])


def make_record(sample_id, qa: list[tuple[str, str]], image) -> dict:
    turns = [t for q, a in qa for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    record = {"id": sample_id, "conversations": turns}
    if image is not None:
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        record["image"] = image
    return record


def corrupt(record: dict, change: tuple) -> dict:
    """`record` with one change: ("drop", key), ("rename", new), ("set", key, value), ("turn", i, field, value or
    None to drop the field), ("append", turn), ("pop",)."""
    record, kind = dict(record), change[0]
    turns = record.get("conversations")
    if kind == "drop":
        record.pop(change[1], None)
    elif kind == "rename" and "conversations" in record:
        record[change[1]] = record.pop("conversations")
    elif kind == "set":
        record[change[1]] = change[2]
    elif kind in ("turn", "append", "pop") and isinstance(turns, list) and turns:
        turns = record["conversations"] = [dict(t) if isinstance(t, dict) else t for t in turns]
        if kind == "append":
            turns.append(change[1])
        elif kind == "pop":
            turns.pop()
        elif isinstance(turn := turns[change[1] % len(turns)], dict):
            _, _, key, value = change
            if value is None:
                turn.pop(key, None)
            else:
                turn[key] = value
    return record


CHANGE = st.one_of(
    st.tuples(st.just("drop"), KEYS),
    st.tuples(st.just("rename"), st.sampled_from(["conversation", "conversatons", "Conversations", "dialogue"])),
    st.tuples(st.just("set"), KEYS | st.text(max_size=6), JUNK | TEXT | IMAGE),
    st.tuples(st.just("set"), st.just("image"), IMAGE),
    st.tuples(
        st.just("turn"), st.integers(0, 5), st.sampled_from(["from", "value"]), st.none() | JUNK | TEXT | SPEAKER
    ),
    st.tuples(st.just("append"), TURN | st.fixed_dictionaries({"from": st.just("human"), "value": PLAIN})),
    st.tuples(st.just("pop")),
)
VALID = st.builds(
    make_record,
    st.text(max_size=12) | st.integers(),
    st.lists(st.tuples(PLAIN | TEXT, PLAIN | TEXT), min_size=1, max_size=3),
    st.sampled_from([None, "ok.png", ["ok.png"]]),
)
DOCUMENT = st.fixed_dictionaries(
    {"id": st.text(max_size=6), "text_list": st.lists(TEXT, max_size=3) | JUNK},
    optional={"image_info": st.lists(st.fixed_dictionaries({"image_name": st.just("ok.png") | JUNK,
                                                            "matched_text_index": st.integers(-1, 3)}) | JUNK,
                                     max_size=2)},
)  # fmt: skip
CORRUPTED = st.builds(lambda rec, changes: functools.reduce(corrupt, changes, rec), VALID, st.lists(CHANGE, max_size=3))
RECORD = st.sampled_from([DOCUMENT, JUNK] + [CORRUPTED] * 8).flatmap(lambda kind: kind)


def expected_id(record, index: int) -> object:
    """The id a message must name: the record's id when usable, else its place in the file."""
    sample_id = record.get("id") if isinstance(record, dict) else None
    if isinstance(sample_id, bool) or not isinstance(sample_id, str | int):
        return f"#{index}"
    return sample_id if not isinstance(sample_id, str) or sample_id.strip() else f"#{index}"


def check_outcome(outcome, record, index: int) -> None:
    """`outcome` is a processed sample or our own error naming the sample."""
    if isinstance(outcome, SampleError):
        assert str(outcome).startswith(f"sample {expected_id(record, index)}: ") and outcome.problem.strip()
        return
    ids, labels, media = outcome
    assert isinstance(ids, list) and isinstance(labels, list) and len(ids) == len(labels) > 0
    assert all(type(t) is int for t in ids) and all(y in (IGNORE_INDEX, t) for t, y in zip(ids, labels, strict=True))
    for tensor in media.values():
        assert isinstance(tensor, torch.Tensor) and tensor.shape[1:] == (3, SIZE, SIZE)
        assert torch.isfinite(tensor).all()


def process(proc, record, index: int, folder):
    try:
        conv = parse_record(record, index)
        ids, labels = proc.tokenize(conv)
        media = proc.media(conv, folder)
        proc.prompt_ids(conv)  # the evaluation path reads the same records
    except SampleError as err:
        return err
    return ids, labels, media


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    Image.new("RGB", (12, 9), (200, 30, 30)).save(folder / "ok.png")
    return folder


# No example database: the run leaves no .hypothesis folder; a failure prints the example that reproduces it.
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=RECORD, template=st.sampled_from(["chat", "plain"]))
def test_random_corrupted_records_fail_only_with_our_errors(tok, corpus, record, template):
    proc = image_processor(tok, tokens_per_image=N_IMG, image_size=SIZE, template=template, max_length=256)
    direct = process(proc, record, 0, corpus)
    check_outcome(direct, record, 0)
    event("processed" if not isinstance(direct, SampleError) else re.sub(r"\d+", "N", direct.problem)[:24])
    (corpus / "data.json").write_text(json.dumps([record]))
    item = ConversationDataset(corpus / "data.json", corpus, proc)[0]
    if isinstance(direct, SampleError):
        assert item == {"id": direct.sample_id, "error": str(direct)}
    else:
        assert item["id"] == expected_id(record, 0) and item["input_ids"] == direct[0] and item["labels"] == direct[1]
        assert item["media"].keys() == direct[2].keys()
