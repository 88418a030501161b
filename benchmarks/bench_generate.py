"""Generation benchmark: tokens/s of mmalign's `generate` vs transformers' LlavaForConditionalGeneration.generate.

Same tiny config and weights (ours are imported from the HF model by `mmalign import`'s converter), same batch
(prompts of different lengths, one image each, left-padded), greedy, and exactly `--new` tokens per row on both
sides: transformers gets no eos (its generation config's eos is cleared) and mmalign a stop id that no token has,
so neither stops early and no logits processor touches the scores. Each implementation runs in its own process
with a fixed number of torch threads; the greedy tokens of both must be identical.

    python benchmarks/bench_generate.py [--batch 8] [--new 32] [--reps 4] [--rounds 2] [--threads 1] [--device cuda]
    python benchmarks/bench_generate.py --profile   # also: where mmalign's time goes inside generate()
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VISION = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8
)
TEXT = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    vocab_size=32064,  # Llama/Vicuna's 32k, as LLaVA-1.5
)
IMAGE_TOKEN, PAD_TOKEN = 32000, 32001
N_IMAGE = (VISION["image_size"] // VISION["patch_size"]) ** 2  # "default" strategy: the CLS token is dropped


def build_reference(folder: Path) -> None:
    """A random HF Llava with the tiny config above and a tokenizer, saved as `mmalign import` expects it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(**TEXT),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    _write_tokenizer(folder, TEXT["vocab_size"])


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """The importer needs a tokenizer whose <image> id is the model's image token; a word-level one does (its text
    is never used: the benchmark feeds ids)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = {0: "<unk>", 1: "<s>", 2: "</s>", IMAGE_TOKEN: "<image>", PAD_TOKEN: "<pad>"}
    vocab = {specials.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )
    tok.save_pretrained(folder)


def make_prompts(batch: int, seed: int = 0) -> tuple[list[list[int]], torch.Tensor]:
    """`batch` prompts of different lengths, <s> words <image tokens> words, and one image each."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(batch):
        words = torch.randint(3, IMAGE_TOKEN, (6 + 5 * i,), generator=g).tolist()  # 6, 11, ... words: all differ
        prompts.append([1] + words[:3] + [IMAGE_TOKEN] * N_IMAGE + words[3:])
    pixels = torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=g)
    return prompts, pixels


def hf_inputs(prompts: list[list[int]], pixels: torch.Tensor) -> dict:
    """Left-padded ids and mask for transformers (written here, not taken from mmalign, so the two sides share
    nothing but the prompts)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), PAD_TOKEN)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def load_generator(impl: str, folder: Path, args: argparse.Namespace):
    """The model, and a function () -> (B, new) token ids, for transformers (`hf`) or mmalign (`ours`)."""
    device, new = args.device, args.new
    prompts, pixels = make_prompts(args.batch)
    if impl == "hf":
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(folder / "hf").to(device).eval()
        model.generation_config.eos_token_id = None  # run to max_new_tokens: no stop, no min-length processor
        model.generation_config.pad_token_id = PAD_TOKEN
        inputs = {k: v.to(device) for k, v in hf_inputs(prompts, pixels).items()}

        def run() -> list[list[int]]:
            out = model.generate(**inputs, do_sample=False, max_new_tokens=new)
            return out[:, inputs["input_ids"].shape[1] :].tolist()

    else:
        from mmalign.generate import generate
        from mmalign.train.checkpoint import load_checkpoint

        model, _, _ = load_checkpoint(folder / "ours", device=device)
        media = {"image": pixels.to(device)}  # on the device up front, as transformers' inputs are

        def run() -> list[list[int]]:
            return generate(model, prompts, media, pad_id=PAD_TOKEN, stop_ids=[-1], max_new_tokens=new)

    return model, run


def timed(run, device: str) -> tuple[float, object]:
    """Seconds for one call (device work included) and its result."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def run_child(impl: str, folder: Path, args: argparse.Namespace) -> dict:
    """One implementation's timings (seconds per generate call), its tokens, and mmalign's profile if asked."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        model, run = load_generator(impl, folder, args)
        for _ in range(args.warmup):  # allocator, kernels, lazy imports inside generate
            run()
        times, tokens = [], None
        for _ in range(args.reps):
            seconds, tokens = timed(run, args.device)
            times.append(seconds)
        result = {"impl": impl, "seconds": times, "tokens": tokens}
        if args.profile and impl == "ours":  # after the timed calls, so profiling cannot slow them
            result["profile"] = profile_ours(model, args)
    return result


def profile_ours(model, args: argparse.Namespace) -> dict:
    """Where mmalign's time goes inside `generate`: its `prefill` (and the image encoder + connector in it), its
    decode `step`s (how many, and the median one), the loop's own work (token picking, stop checks, lists) as what
    is left, and the op-level split of decode steps."""
    from mmalign.generate import generate, left_pad

    prompts, pixels = make_prompts(args.batch)
    media = {"image": pixels.to(args.device)}
    spent = _instrument(model, args.device)
    totals = []
    for _ in range(args.reps):
        seconds, _ = timed(
            lambda: generate(model, prompts, media, pad_id=PAD_TOKEN, stop_ids=[-1], max_new_tokens=args.new),
            args.device,
        )
        totals.append(seconds)
    del model.prefill, model.step  # back to the class's own methods
    encode = [timed(lambda: model.encode("image", media["image"]), args.device)[0] for _ in range(args.reps)]
    ids, mask = (t.to(args.device) for t in left_pad(prompts, PAD_TOKEN))
    return {
        "generate_s": statistics.median(totals),
        "prefill_s": statistics.median(spent["prefill"]),
        "image_encode_s": statistics.median(encode),
        "step_s": statistics.median(spent["step"]),
        "steps_s": sum(spent["step"]) / args.reps,
        "steps_per_call": len(spent["step"]) // args.reps,
        "step_split": _step_split(model, ids, mask, media, args),
    }


def _instrument(model, device: str) -> dict[str, list[float]]:
    """Time every `prefill` and `step` call on this instance (what `generate` calls); the lists fill as it runs."""
    spent: dict[str, list[float]] = {"prefill": [], "step": []}
    for name in spent:
        method = getattr(model, name)

        def wrapper(*a, _method=method, _name=name):
            seconds, out = timed(lambda: _method(*a), device)
            spent[_name].append(seconds)
            return out

        setattr(model, name, wrapper)
    return spent


def _step_split(model, ids, mask, media, args: argparse.Namespace) -> dict[str, float]:
    """Share of decode-step time per kind of op, from torch.profiler self times (CPU or CUDA): the median share
    over `reps` generations, since memory-bound ops swing with what else runs on the machine."""
    shares: dict[str, list[float]] = {}
    for _ in range(args.reps):
        for kind, share in _one_split(model, ids, mask, media, args).items():
            shares.setdefault(kind, []).append(share)
    split = {kind: statistics.median(v + [0.0] * (args.reps - len(v))) for kind, v in shares.items()}
    return dict(sorted(split.items(), key=lambda kv: -kv[1]))


def _one_split(model, ids, mask, media, args: argparse.Namespace) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    logits, state = model.prefill(ids, mask, media, args.new)  # sized as generate() sizes it
    token = logits.argmax(-1)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.new - 1):
            token = model.step(state, token).argmax(-1)
    split: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        kind = _op_kind(event.key, event.input_shapes)
        split[kind] = split.get(kind, 0.0) + (event.self_device_time_total if cuda else event.self_cpu_time_total)
    whole = sum(split.values()) or 1.0
    return {kind: spent / whole for kind, spent in split.items()}


def _op_kind(name: str, shapes) -> str:
    """Bucket one profiler row. On CPU the LM head is the matmul with a vocabulary-sized operand; CUDA kernel rows
    carry no shapes, so there it counts among the other matmuls."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm") or "gemm" in name.lower():
        lm_head = any(shape and shape[-1] == TEXT["vocab_size"] for shape in shapes or [])
        return "LM head matmul" if lm_head else "other matmuls"
    if name == "aten::cat" or "CatArray" in name:  # DynamicCache grows K and V by concatenation, the mask too
        return "concatenation (KV cache, mask)"
    if "scaled_dot_product" in name or "attention" in name.lower() or "flash" in name.lower():
        return "attention"
    return "everything else"


def compare(args: argparse.Namespace) -> None:
    """Build, import, time both implementations in alternating child processes, print the figures and the verdict."""
    from mmalign.interop.hf_llava import import_hf_llava

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_reference(folder / "hf")
        import_hf_llava(folder / "hf", folder / "ours")
        # hf, ours, hf, ours, ...: on a shared machine the load drifts, and alternating spreads the drift over both.
        runs = [_spawn(impl, folder, args, profile=args.profile and r == args.rounds - 1)
                for r in range(args.rounds) for impl in ("hf", "ours")]  # fmt: skip
    seconds = {impl: [t for run in runs if run["impl"] == impl for t in run["seconds"]] for impl in ("hf", "ours")}
    rate = {impl: args.batch * args.new / statistics.median(ts) for impl, ts in seconds.items()}
    print(f"{'':14}{'tokens/s':>10}{'median s':>10}{'min s':>8}{'max s':>8}")
    for name, impl in (("transformers", "hf"), ("mmalign", "ours")):
        ts = seconds[impl]
        print(f"{name:14}{rate[impl]:>10.1f}{statistics.median(ts):>10.3f}{min(ts):>8.3f}{max(ts):>8.3f}")
    ratio = rate["ours"] / rate["hf"]
    verdict = "met" if ratio >= 1.2 else "NOT met"
    print(f"speed ratio (mmalign / transformers): {ratio:.2f}x (target >= 1.20x: {verdict})")
    reference = runs[0]["tokens"]
    same = all(run["tokens"] == reference for run in runs)
    print(f"greedy tokens identical: {same} ({args.batch} rows x {args.new} tokens, every process)")
    for run in runs:
        if "profile" in run:
            _print_profile(run["profile"], args.new)
    assert same, "greedy outputs differ between transformers and mmalign on the same weights"


def _print_profile(p: dict, new: int) -> None:
    ms = {k: v * 1e3 for k, v in p.items() if k.endswith("_s")}
    rest = ms["generate_s"] - ms["prefill_s"] - ms["steps_s"]
    print("\nmmalign profile, inside generate() (medians):")
    print(f"  generate() call  {ms['generate_s']:8.2f} ms")
    print(f"  prefill          {ms['prefill_s']:8.2f} ms (image encoder + connector: {ms['image_encode_s']:.2f} ms)")
    print(f"  decode steps     {ms['steps_s']:8.2f} ms = {p['steps_per_call']} x {ms['step_s']:.2f} ms"
          f" (for {new} tokens; {new - 1} needed, the first comes from prefill)")  # fmt: skip
    print(f"  loop's own work  {rest:8.2f} ms (token picking, stop checks, lists)")
    print("  decode-step time by op:")
    for kind, share in p["step_split"].items():
        print(f"    {kind:32}{share:6.1%}")


def _spawn(impl: str, folder: Path, args: argparse.Namespace, profile: bool) -> dict:
    """One implementation in a fresh process, so neither inherits the other's allocator or thread state."""
    cmd = [sys.executable, __file__, "--child", impl, "--folder", str(folder), "--device", args.device]
    cmd += ["--batch", str(args.batch), "--new", str(args.new), "--reps", str(args.reps)]
    cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads)] + (["--profile"] if profile else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="prompts per generate call (each with one image)")
    ap.add_argument("--new", type=int, default=32, help="new tokens per prompt (no early stop)")
    ap.add_argument("--reps", type=int, default=4, help="timed generate calls per process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per implementation, alternating")
    ap.add_argument("--warmup", type=int, default=2, help="untimed generate calls first")
    # One thread by default: decoding a tiny model is memory- and overhead-bound, and on a shared CPU a second
    # thread mostly adds barrier waits and noise. Raise it on a quiet machine.
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="time mmalign's prefill and decode steps separately")
    ap.add_argument("--child", choices=["hf", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.folder, args)))
        return

    import transformers

    transformers.utils.logging.disable_progress_bar()
    print(f"device: {args.device}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"vision: CLIP {VISION}")
    print(f"text: Llama {TEXT}")
    print(
        f"batch {args.batch} (prompt lengths {sorted(len(p) for p in make_prompts(args.batch)[0])}, {N_IMAGE} image "
        f"tokens each), greedy, {args.new} new tokens per row; per implementation {args.rounds} processes x "
        f"({args.warmup} warm-up + {args.reps} timed calls), median over all; torch threads {args.threads}\n"
    )
    compare(args)


if __name__ == "__main__":
    main()
