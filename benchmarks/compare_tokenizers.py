"""Which tokenizer should stage 0 build for a dataset? Word list vs byte-level BPE vs MiniLM's WordPiece.

    python benchmarks/compare_tokenizers.py [--n-train 300] [--hidden 128]

Each kind is built from the TRAIN text of a small shapes dataset only (captions + conversations), then measured
on (a) held-out text from the same world (qa_test.json) and (b) unseen English with new words, capitals, digits
and non-ASCII characters:

- vocab: ids in the tokenizer; emb+head: the parameters an untied LM of width `--hidden` spends on them
- unk%: share of tokens that are `<unk>`; tok/word: tokens per whitespace-separated word
- exact%: texts where `decode(encode(t), skip_special_tokens=True).strip() == t` (as the CLI decodes answers)
- conv len: mean tokens of a training conversation through the chat template (sequence length for training)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mmalign.data.shapes import corpus_texts, write_shapes_dataset
from mmalign.data.tokenizer import build_subword_tokenizer, build_word_tokenizer, build_wordpiece_tokenizer

UNSEEN = [
    "The Eiffel Tower is 330 metres tall.",
    "Zebras graze near Lake Victoria in 2024!",
    "Describe the violet hexagon in the top-left corner, please.",
    "How many GPUs did the lab use for GPT-3?",
    "Naïve café owners in Zürich serve crème brûlée.",
    "She said: \"It's only 7:45 pm, isn't it?\"",
    "Tokyo (東京) is the capital of Japan 🗾.",
    "A Dalmatian sleeps beside two striped umbrellas.",
]

CONVERSATION_ROLES = {"human": "user", "gpt": "assistant"}


def load_records(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def plain_texts(records: list[dict]) -> list[str]:
    """Turn texts without the `<image>` placeholder: what gets decoded and compared (as the LM corpus does)."""
    return [t.replace("<image>", "").strip() for t in corpus_texts(records)]


def as_messages(record: dict) -> list[dict]:
    return [{"role": CONVERSATION_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]


def measure(tokenizer, texts: list[str]) -> dict:
    """unk share, tokens per word and round-trip exactness of `texts`."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n_tokens = sum(len(x) for x in ids)
    n_unk = sum(x.count(tokenizer.unk_token_id) for x in ids)
    n_words = sum(len(t.split()) for t in texts)
    exact = sum(tokenizer.decode(x, skip_special_tokens=True).strip() == t for x, t in zip(ids, texts, strict=True))
    return {"unk": 100 * n_unk / n_tokens, "tpw": n_tokens / n_words, "exact": 100 * exact / len(texts)}


def conversation_length(tokenizer, records: list[dict]) -> float:
    rows = [tokenizer.apply_chat_template(as_messages(r), tokenize=True, return_dict=True) for r in records]
    return statistics.mean(len(r["input_ids"]) for r in rows)


def builders() -> dict:
    return {
        "word": lambda texts: build_word_tokenizer(texts),
        "bpe (default)": lambda texts: build_subword_tokenizer(texts, vocab_size=1000),
        "wordpiece pruned": lambda texts: build_wordpiece_tokenizer(texts, prune=True),
        "wordpiece full": lambda texts: build_wordpiece_tokenizer(texts, prune=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=128, help="LM width for the embedding + head count")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shapes_dataset(tmp, n_train=args.n_train, n_val=5, n_test=50)
        train = load_records(paths["captions"]) + load_records(paths["conversations"])
        test = load_records(paths["test"])
    train_texts = corpus_texts(train)
    held_out = plain_texts(test)
    print(f"built from {len(train_texts)} train texts; held out: {len(held_out)} qa_test texts, {len(UNSEEN)} unseen")

    header = (
        f"{'kind':<17} {'vocab':>6} {'emb+head':>9} | {'held-out: unk%':>14} {'tok/word':>8} {'exact%':>6} | "
        f"{'unseen: unk%':>12} {'tok/word':>8} {'exact%':>6} | {'conv len':>8} {'build s':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, build in builders().items():
        start = time.perf_counter()
        tokenizer = build(train_texts)
        seconds = time.perf_counter() - start
        a, b = measure(tokenizer, held_out), measure(tokenizer, UNSEEN)
        params = 2 * args.hidden * len(tokenizer)  # untied input embedding + output head
        length = conversation_length(tokenizer, train)
        print(
            f"{name:<17} {len(tokenizer):>6} {params:>9,} | {a['unk']:>14.1f} {a['tpw']:>8.2f} {a['exact']:>6.0f} | "
            f"{b['unk']:>12.1f} {b['tpw']:>8.2f} {b['exact']:>6.0f} | {length:>8.1f} {seconds:>7.2f}"
        )

    bpe = build_subword_tokenizer(train_texts)
    for text in UNSEEN[:3]:
        print(f"bpe: {text!r} -> {bpe.tokenize(text)}")


if __name__ == "__main__":
    main()
