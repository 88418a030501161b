"""Greedy answers of an exported model are the same under transformers' `generate` as under mmalign's, stop included.

The model is the tiny random Llava imported with the real converter, with one change so that the stop path runs:
the LM head row of eos becomes a scaled copy of a token's row (the "trigger"), so eos wins wherever that token
would. The trigger is searched for, not hard-coded, so a different random init still yields a batch where some
rows end on eos and others run to the token limit.

transformers reads everything it needs from the export: its processor builds the inputs from `<image>` text and
PIL images, and `generate` gets no eos or pad id by hand, so it stops only if the export wrote them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.config import DataConfig
from mmalign.data.processor import Conversation, processor_for
from mmalign.data.shapes import QUESTIONS
from mmalign.generate import generate
from mmalign.interop.hf_llava import export_hf_llava, import_hf_llava
from mmalign.train.checkpoint import load_checkpoint

MAX_NEW = 8
# Questions of different lengths, so the batch is left-padded.
BATCH_QUESTIONS = [QUESTIONS["color"][0], QUESTIONS["count"][2], QUESTIONS["position"][2], QUESTIONS["size"][0]]
EOS_SCALE = 1.1  # eos logit = 1.1 x the trigger's: a margin far above float noise where the trigger is the argmax


@dataclass
class Exported:
    folder: Path  # the export, as transformers loads it
    tokenizer: object
    conversations: list[Conversation]
    prompts: list[list[int]]  # built by mmalign's processor
    answers: list[list[int]]  # mmalign's greedy answers (eos excluded)
    logits: list[torch.Tensor]  # (B, V) per step: what mmalign's generate picked each token from


def _conversations(shapes) -> list[Conversation]:
    """One user turn per row: a shapes image (PIL) and a question of its own length."""
    images = sorted(Path(shapes["images"]).glob("test_*.png"))[: len(BATCH_QUESTIONS)]  # distinct images
    return [
        Conversation(
            id=i,
            media={"image": [Image.open(path).convert("RGB")]},
            messages=[{"role": "user", "content": f"<image>\n{question}"}],
        )
        for i, (path, question) in enumerate(zip(images, BATCH_QUESTIONS, strict=True))
    ]


def _greedy(model, tokenizer, prompts, pixels, stop_ids) -> tuple[list[list[int]], list[torch.Tensor]]:
    """mmalign's batched greedy answers, and the logits of every step as `prefill` and `step` hand them to
    `generate` (tokens alone miss small errors, a decode position off by one say, that a random model's argmax
    shrugs off)."""
    logits: list[torch.Tensor] = []
    prefill, step = model.prefill, model.step

    def recording_prefill(*args):
        out, state = prefill(*args)
        logits.append(out.clone())
        return out, state

    def recording_step(*args):
        logits.append(step(*args).clone())
        return logits[-1]

    model.prefill, model.step = recording_prefill, recording_step  # on the instance only, undone below
    try:
        answers = generate(
            model, prompts, {"image": pixels}, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids, max_new_tokens=MAX_NEW
        )
    finally:
        del model.prefill, model.step
    return answers, logits


def _make_eos_follow(model, eos: int, trigger: int) -> None:
    """Point the eos row of the LM head along the trigger's row, so eos is produced where the trigger would be."""
    head = model.lm_head.weight
    with torch.no_grad():
        head[eos] = EOS_SCALE * head[trigger]


def _mixed_stops(answers: list[list[int]]) -> bool:
    """Some rows end on eos before the limit and some run to it: both the stop and the carry-on path are used."""
    lengths = [len(a) for a in answers]
    return min(lengths) < MAX_NEW and max(lengths) == MAX_NEW


@pytest.fixture(scope="module")
def exported(tiny_hf_llava, shapes, tmp_path_factory) -> Exported:
    """Import the tiny Llava, make eos follow a trigger token chosen so the batch stops in some rows only, export."""
    tmp = tmp_path_factory.mktemp("generate_hf")
    model, tokenizer, model_cfg = load_checkpoint(import_hf_llava(tiny_hf_llava, tmp / "ours"))
    conversations = _conversations(shapes)
    proc = processor_for(model, tokenizer, DataConfig(template="chat"))  # mmalign's own inputs
    prompts = [proc.prompt_ids(c) for c in conversations]
    pixels = torch.cat([proc.media(c)["image"] for c in conversations])
    eos = tokenizer.eos_token_id
    free, _ = _greedy(model, tokenizer, prompts, pixels, stop_ids=[-1])
    original = model.lm_head.weight[eos].clone()
    # Candidates: tokens the free run produces after its first step, in order of appearance.
    candidates = dict.fromkeys(t for answer in free for t in answer[1:] if t != eos)
    for trigger in candidates:
        _make_eos_follow(model, eos, trigger)
        answers, logits = _greedy(model, tokenizer, prompts, pixels, stop_ids=[eos])
        if _mixed_stops(answers):
            break
        with torch.no_grad():
            model.lm_head.weight[eos] = original
    else:
        pytest.fail(f"no trigger token among {list(candidates)} stops some rows and not others")
    export_hf_llava(model, tokenizer, model_cfg, tmp / "hf")
    return Exported(tmp / "hf", tokenizer, conversations, prompts, answers, logits)


def test_export_carries_special_token_ids(exported):
    """config.json (text config) and generation_config.json hold the tokenizer's bos/eos/pad ids."""
    from transformers import LlavaForConditionalGeneration

    tok = exported.tokenizer
    expected = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    assert None not in expected.values()  # the shapes tokenizer has all three: a None here would prove nothing
    text_config = json.loads((exported.folder / "config.json").read_text())["text_config"]
    generation = json.loads((exported.folder / "generation_config.json").read_text())
    assert {k: text_config.get(k) for k in expected} == expected
    assert {k: generation.get(k) for k in expected} == expected
    loaded = LlavaForConditionalGeneration.from_pretrained(exported.folder).generation_config
    assert {k: getattr(loaded, k) for k in expected} == expected


def _hf_inputs(exported):
    """The exported processor's batch: chat-rendered `<image>` text and PIL images, left-padded."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported.folder)
    processor.tokenizer.padding_side = "left"  # generation continues from the last column
    texts = [
        processor.apply_chat_template(c.messages, tokenize=False, add_generation_prompt=True)
        for c in exported.conversations
    ]
    images = [c.media["image"][0] for c in exported.conversations]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def test_exported_processor_builds_our_prompts(exported):
    """Same prompt ids on both sides, or the answer comparison below compares different questions."""
    enc = _hf_inputs(exported)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    assert rows == exported.prompts
    assert len({len(r) for r in rows}) > 1  # the batch really is padded


def _hf_generate(exported, **kw):
    """transformers' greedy `generate` on the export; eos and pad come from the exported configs only."""
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(exported.folder).eval()
    enc = _hf_inputs(exported)
    with torch.no_grad():
        return enc, hf.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW, **kw)


def test_hf_greedy_generate_matches_ours(exported):
    """transformers' greedy `generate` on the export, batched and left-padded, gives mmalign's answers, and stops
    on the exported eos: each row is its answer, then eos and padding if it ended before the limit."""
    tok, answers = exported.tokenizer, exported.answers
    assert _mixed_stops(answers)  # the fixture's setup, checked again so a change there cannot hollow this test
    enc, out = _hf_generate(exported)
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    for row, answer in zip(new, answers, strict=True):
        cut = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        assert tok.decode(cut) == tok.decode(answer)
        ended = answer + [tok.eos_token_id] if len(answer) < MAX_NEW else answer
        assert row == ended + [tok.pad_token_id] * (len(row) - len(ended))  # stopped: nothing but padding after


def test_hf_step_logits_match_ours(exported):
    """Each step's logits agree too, for every row up to and including the step that produced its eos (after that
    transformers feeds padding and mmalign whatever it picked, so the rows legitimately differ)."""
    _, out = _hf_generate(exported, output_logits=True, return_dict_in_generate=True)
    assert len(out.logits) == MAX_NEW  # one row runs to the limit
    ours = exported.logits[:MAX_NEW]  # prefill's logits, then one per step: the loop never steps past the last token
    for row, answer in enumerate(exported.answers):
        for step in range(min(len(answer) + 1, MAX_NEW)):
            torch.testing.assert_close(
                out.logits[step][row], ours[step][row], msg=lambda m, r=row, s=step: f"row {r} step {s}: {m}"
            )
