"""From a LLaVA-format record to model inputs: messages, token ids with expanded media tokens, labels and media
tensors keyed by modality.

Labels come from per-turn token spans of the chat template: the template's `{% generation %}` mask when it has
one, otherwise the growth of the rendered conversation turn by turn (each render must extend the previous one,
or the sample fails loudly). Substrings are never re-tokenized.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmalign.constants import END_OF_CHUNK, IGNORE_INDEX
from mmalign.modalities import MODALITIES, MediaError, get_modality
from mmalign.modalities.base import set_limits

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleError(ValueError):
    """A training or evaluation sample that cannot be used; the message starts with its id."""

    def __init__(self, sample_id: object, problem: str):
        super().__init__(f"sample {sample_id}: {problem}")
        self.sample_id = sample_id
        self.problem = problem


@dataclass
class Conversation:
    id: object
    media: dict[str, list]  # modality -> its items (paths relative to the media folder, or arrays / bytes)
    messages: list[dict]
    meta: dict = field(default_factory=dict)

    @property
    def is_document(self) -> bool:
        """An interleaved document: one `document` message of running text rather than chat turns."""
        return bool(self.messages) and self.messages[0]["role"] == "document"


LAYOUT_HINT = "a LLaVA file is a JSON list of records, or JSONL with one record per line"


def read_records(path: str | Path) -> list[dict]:
    """A LLaVA JSON list or a JSONL file, unchanged. A file that does not parse is a ValueError naming the file,
    the line and the column: one bad byte must not become a bare JSONDecodeError far from its cause."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); {LAYOUT_HINT}") from err
    if path.suffix == ".jsonl":
        return [_jsonl_line(line, path, n) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        extra = " (a second value follows the first: is it JSONL? name it .jsonl)" if err.msg == "Extra data" else ""
        raise ValueError(
            f"{path}: not valid JSON at line {err.lineno} column {err.colno} ({err.msg}){extra}; {LAYOUT_HINT}"
        ) from err
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples")
    return data


def _jsonl_line(line: str, path: Path, n: int) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: line {n} is not valid JSON ({err.msg} at column {err.colno}); a JSONL file holds one JSON "
            "record per line"
        ) from err


def _media_keys() -> dict[str, str]:
    """{record key: modality} over every registered modality (`image` -> image, `audio` -> audio, ...)."""
    import mmalign.modalities  # noqa: F401  (registers the built-in modalities)

    return {MODALITIES.get(name).record_key: name for name in MODALITIES.names()}


def parse_document(record: dict, index: int) -> Conversation:
    """Validate one interleaved document in MMC4's shape: `text_list` (sentences) and `image_info` (a list of
    {image_name, matched_text_index}). Each image opens a chunk before its sentence; chunks end with
    `<|endofchunk|>`. The result is one `document` message whose text carries the placeholders."""
    sample_id = _sample_id(record, index)
    texts, images = record.get("text_list"), record.get("image_info") or []
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise SampleError(sample_id, "text_list must be a list of strings")
    if not isinstance(images, list) or not images:
        raise SampleError(sample_id, "an interleaved document needs at least one image in image_info")
    at: dict[int, list[str]] = {}
    for j, info in enumerate(images):
        where = info.get("matched_text_index") if isinstance(info, dict) else None
        name = info.get("image_name") if isinstance(info, dict) else None
        if not isinstance(name, str) or not isinstance(where, int) or not 0 <= where < len(texts):
            raise SampleError(
                sample_id, f"image_info[{j}] needs image_name and a matched_text_index within the {len(texts)} texts"
            )
        if not texts[where].strip():
            raise SampleError(sample_id, f"image {name} has no text after it (text {where} is empty)")
        at.setdefault(where, []).append(name)
    placeholder = get_modality("image").placeholder
    parts: list[str] = []
    for i, text in enumerate(texts):
        if i in at:
            if i > min(at):  # an earlier image's chunk ends here
                parts.append(END_OF_CHUNK)
            parts.append(placeholder * len(at[i]))
        parts.append(text.strip() + " ")
    document = "".join(parts).rstrip() + END_OF_CHUNK
    names = [name for i in sorted(at) for name in at[i]]
    return Conversation(id=sample_id, media={"image": names}, messages=[{"role": "document", "content": document}])


def parse_record(record: dict, index: int) -> Conversation:
    """An interleaved document (a record with `text_list`) or a LLaVA conversation; see the parsers."""
    if isinstance(record, dict) and "text_list" in record:
        return parse_document(record, index)
    return parse_conversation(record, index)


def _sample_id(record: dict, index: int) -> object:
    """The record's `id` (a string or an integer), or `#index` (its place in the file) when it has none."""
    sample_id = record.get("id")
    if sample_id is None or (isinstance(sample_id, str) and not sample_id.strip()):
        return f"#{index}"
    if isinstance(sample_id, bool) or not isinstance(sample_id, str | int):
        raise SampleError(f"#{index}", f"id must be a string or an integer, got {_short(sample_id)}")
    return sample_id


def _short(value: object, limit: int = 80) -> str:
    """repr(value), cut past `limit` characters: a junk value must not flood the message naming it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__} of {len(text)} characters)"


def _missing_key(record: dict, key: str) -> str:
    """'no "key" key', naming a record key that looks like a misspelling of it (`conversation`, `Conversations`)."""
    names = {k.lower(): k for k in record if isinstance(k, str)}
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.8)
    return f'no "{key}" key (found "{names[close[0]]}": did you mean {key}?)' if close else f'no "{key}" key'


def _message(turn: dict, i: int, sample_id: object) -> dict:
    """One {from, value} turn as a chat message; `value` must be text (a number is taken as its text)."""
    speaker, value = turn.get("from"), turn.get("value")
    role = ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
        raise SampleError(sample_id, f"unknown speaker {_short(speaker)} in turn {i} (expected human/gpt)")
    if "value" not in turn:
        raise SampleError(sample_id, f'turn {i} has no "value"')
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SampleError(sample_id, f"turn {i} value must be text, got {_short(value)}")
    return {"role": role, "content": str(value)}


def parse_conversation(record: dict, index: int) -> Conversation:
    """Validate one LLaVA record: `id`, `conversations` of {from, value}, and optional media keyed by modality:
    `image` (a path or a list of paths, as LLaVA), `audio`, ... (each registered modality's record key)."""
    if not isinstance(record, dict):
        raise SampleError(f"#{index}", f"expected a JSON object, got {type(record).__name__}")
    sample_id = _sample_id(record, index)
    if "conversations" not in record:
        raise SampleError(sample_id, _missing_key(record, "conversations"))
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise SampleError(sample_id, f"conversations must be a list of {{from, value}} objects, got {_short(turns)}")
    if not turns:
        raise SampleError(sample_id, "empty conversation")
    messages = [_message(turn, i, sample_id) for i, turn in enumerate(turns)]
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError(sample_id, "conversation has no assistant (gpt) turn")
    keys = _media_keys()
    media = {}
    for key, modality in keys.items():
        value = record.get(key)
        if value is None:
            continue
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise SampleError(sample_id, f"{key} must be a path or a list of paths, got {_short(value)}")
        if items:
            media[modality] = items
    meta = {k: v for k, v in record.items() if k not in ("id", "conversations", *keys)}
    return Conversation(id=sample_id, media=media, messages=messages, meta=meta)


@dataclass(frozen=True)
class MediaSpec:
    """How one modality enters a sample: its placeholder, the id it expands to, how many ids per item, and the
    encoder whose settings preprocessing follows."""

    modality: str
    placeholder: str
    token_id: int
    tokens_per_item: int
    encoder: object

    def tensor(self, source, sample_id, folder: str | Path = "") -> torch.Tensor:
        modality = get_modality(self.modality)
        try:
            return modality.preprocess(modality.load(modality.resolve(source, folder)), self.encoder)
        except MediaError as err:
            raise SampleError(sample_id, str(err)) from err


class Processor:
    """Turns a Conversation into `input_ids`, `labels` and media tensors keyed by modality for one sample."""

    def __init__(self, tokenizer, *, media: list[MediaSpec], template: str = "chat", max_length: int = 2048):
        if template not in ("chat", "plain"):
            raise ValueError(f"template must be chat or plain, got {template!r}")
        if template == "chat" and not tokenizer.chat_template:
            raise ValueError("template=chat but the tokenizer has no chat_template")
        self.tokenizer = tokenizer
        self.specs = {spec.modality: spec for spec in media}
        self.by_token = {spec.token_id: spec for spec in media}
        self.template = template
        self.max_length = max_length

    # ------------------------------------------------------------------------------------------- text
    def _render(self, conv: Conversation, messages: list[dict], add_generation_prompt: bool, **kw) -> dict:
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2, an optional dependency

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt, **kw
            )
        except TemplateError as err:  # e.g. a template's raise_exception("roles must alternate user/assistant")
            raise SampleError(conv.id, f"the chat template refused the conversation: {err}") from err

    def _chat_spans(self, conv: Conversation) -> tuple[list[int], list[int]]:
        msgs = conv.messages
        if _GENERATION_TAG.search(self.tokenizer.chat_template or ""):
            out = self._render(conv, msgs, False, return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
            runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
            n_assistant = sum(m["role"] == "assistant" for m in msgs)
            if runs != n_assistant:
                raise SampleError(conv.id, f"chat template marked {runs} assistant spans for {n_assistant} turns")
            return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        # No generation tags: grow the conversation one turn at a time; each render must extend the last.
        ids: list[int] = []
        labels: list[int] = []
        for i, msg in enumerate(msgs):
            steps = [(msgs[:i], True, False)] if msg["role"] == "assistant" else []
            steps.append((msgs[: i + 1], False, msg["role"] == "assistant"))
            for prefix, gen_prompt, supervised in steps:
                full = list(self._render(conv, prefix, gen_prompt)["input_ids"])
                if full[: len(ids)] != ids:
                    raise SampleError(conv.id, f"chat template output for turn {i} does not extend the earlier turns")
                new = full[len(ids) :]
                labels += new if supervised else [IGNORE_INDEX] * len(new)
                ids = full
        return ids, labels

    def _plain(self, conv: Conversation) -> tuple[list[int], list[int]]:
        # LLaVA stage 1: the media, then the caption (first assistant turn); the human prompt is dropped.
        tok = self.tokenizer
        caption = next(m["content"] for m in conv.messages if m["role"] == "assistant")
        head = self._plain_head(conv)
        body = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return head + body, [IGNORE_INDEX] * len(head) + body

    def _plain_head(self, conv: Conversation) -> list[int]:
        bos = self.tokenizer.bos_token_id
        marks = [self.specs[m].token_id for m, items in conv.media.items() if m in self.specs for _ in items]
        return ([bos] if bos is not None else []) + marks

    def _document_ids(self, conv: Conversation) -> list[int]:
        """A document's running text as ids, after bos; no end token (a prompt continues from here)."""
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + tok(conv.messages[0]["content"], add_special_tokens=False)["input_ids"]

    def _document(self, conv: Conversation) -> tuple[list[int], list[int]]:
        # Interleaved text: every token after the first media item is trained except the placeholders; text before
        # it has nothing to be grounded in (Flamingo's cross-attention gives it no media).
        ids = self._document_ids(conv) + [self.tokenizer.eos_token_id]
        first = next((i for i, t in enumerate(ids) if t in self.by_token), len(ids))
        labels = [IGNORE_INDEX if i <= first or t in self.by_token else t for i, t in enumerate(ids)]
        return ids, labels

    def tokenize(self, conv: Conversation) -> tuple[list[int], list[int]]:
        """Token ids with each placeholder (`<image>`, ...) expanded to its modality's `tokens_per_item` ids, and
        labels (-100 = not trained). Documents are tokenized as running text whatever the template. A conversation
        must end on an assistant turn: a last question with no answer teaches nothing and usually means a record
        was cut (generation prompts, which do end on a question, go through `prompt_ids`)."""
        if conv.is_document:
            ids, labels = self._document(conv)
        else:
            self._check_answered(conv)
            ids, labels = self._plain(conv) if self.template == "plain" else self._chat_spans(conv)
        return self._expand(conv, ids, labels)

    @staticmethod
    def _check_answered(conv: Conversation) -> None:
        if not conv.messages:
            raise SampleError(conv.id, "empty conversation")
        last = conv.messages[-1]["role"]
        if last != "assistant":
            speaker = "human" if last == "user" else last
            raise SampleError(conv.id, f"ends with a {speaker} turn that has no gpt answer")

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """Ids for generation: every turn up to and including the last user turn, then the assistant prompt. A
        document prompt (few-shot) is its text as it stands: the model continues it."""
        if conv.is_document:
            return self._expand(conv, self._document_ids(conv), None)[0]
        msgs = conv.messages
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise SampleError(conv.id, "no user turn to answer")
        if self.template == "plain":
            ids = self._plain_head(conv)
        else:
            ids = list(self._render(conv, msgs, True)["input_ids"])
        return self._expand(conv, ids, None)[0]

    def _expand(self, conv: Conversation, ids: list[int], labels: list[int] | None):
        unread = sorted(set(conv.media) - set(self.specs))
        if unread:
            raise SampleError(conv.id, f"has {', '.join(unread)} but this model reads only {', '.join(self.specs)}")
        for modality, spec in self.specs.items():
            n_marks, n_items = sum(t == spec.token_id for t in ids), len(conv.media.get(modality, []))
            if n_marks != n_items:
                raise SampleError(
                    conv.id, f"{n_marks} {spec.placeholder} placeholders in the text but {n_items} {modality} items"
                )
        out_ids: list[int] = []
        out_labels: list[int] = []
        for i, t in enumerate(ids):
            spec = self.by_token.get(t)
            if spec is not None:
                out_ids += [t] * spec.tokens_per_item
                out_labels += [IGNORE_INDEX] * spec.tokens_per_item
            else:
                out_ids.append(t)
                out_labels.append(labels[i] if labels is not None else IGNORE_INDEX)
        if len(out_ids) > self.max_length:
            raise SampleError(conv.id, f"{len(out_ids)} tokens exceed max_length {self.max_length}")
        if labels is not None and all(x == IGNORE_INDEX for x in out_labels):
            raise SampleError(conv.id, "no supervised tokens")
        return out_ids, out_labels

    # ------------------------------------------------------------------------------------------- media
    def media(self, conv: Conversation, folder: str | Path = "") -> dict[str, torch.Tensor]:
        """{modality: (items, ...)} for the modalities the sample has; empty for a text-only sample."""
        return {
            m: torch.stack([self.specs[m].tensor(item, conv.id, folder) for item in items])
            for m, items in conv.media.items()
            if m in self.specs
        }


def processor_for(model, tokenizer, data_cfg) -> Processor:
    """The processor that feeds `model` (any family): one MediaSpec per modality it reads, the recipe's template.
    A recipe's own chat template (data.chat_template) replaces the tokenizer's. The media loaders take their
    limits from data.limits from here on (every training and evaluation path builds its processor here)."""
    set_limits(data_cfg.limits)
    if data_cfg.chat_template:
        tokenizer.chat_template = data_cfg.chat_template
    specs = [
        MediaSpec(
            modality=m,
            placeholder=get_modality(m).placeholder,
            token_id=model.media_token_ids[m],
            tokens_per_item=model.tokens_per_item(m),
            encoder=model.encoders[m],
        )
        for m in model.modalities
    ]
    return Processor(tokenizer, media=specs, template=data_cfg.template, max_length=data_cfg.max_length)
