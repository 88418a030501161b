"""Typed recipe configs: dataclasses that load from YAML, save to YAML and take `key=value` overrides.

Every field carries a `help` string in its metadata; the CLI prints them, so `--help` documents every key. Choices
are `Literal` types and numbers may carry a range (`ge`, `gt`): both are checked when a config is loaded or
overridden, before any model is built, and the error names the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def _f(default: Any, help: str, **limits: Any) -> Any:
    """A field with its help text and optional numeric limits (ge / gt: the value must be >= / > the limit)."""
    metadata = {"help": help, **limits}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EncoderConfig:
    name: str = _f("clip", "encoder from the registry: clip | siglip (images), audio-transformer (audio), ...")
    path: str | None = _f(None, "folder of a pretrained encoder (HF vision model or mmalign encoder); None = build")
    preset: str | None = _f(None, "built-in size when building from config (e.g. tiny-vit, tiny-audio)")
    config: dict = _f({}, "extra config keys when building from config (e.g. a HF vision config's hidden_size)")
    feature_layer: int = _f(-2, "hidden layer whose output feeds the connector (LLaVA-1.5 uses -2)")
    keep_cls: bool = _f(False, "keep the CLS token (LLaVA 'full') or drop it ('default')")


@dataclass
class ConnectorConfig:
    name: str = _f("mlp2x_gelu", "connector: linear | mlpNx_gelu (N layers; mlp2x_gelu is LLaVA-1.5's)")
    bias: bool = _f(True, "bias in the connector's linear layers")
    fusion: dict = _f(
        {},
        "with extra_encoders: fuse the encoders' features per token before the projector, with a fusion module of "
        "`mmalign classify` ({name: concat | attention | gated | product | bilinear | tensor, dim: 256, settings: "
        "{}}); {} = plain concatenation",
    )


@dataclass
class MediaConfig:
    """One modality's way into the LLM: its encoder(s) and its connector."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    extra_encoders: list[EncoderConfig] = _f(
        [], "more encoders whose features are concatenated per token with `encoder`'s (Prismatic's DINOv2 + SigLIP)"
    )
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    tokenizer: dict = _f(
        {},
        "onellm family: settings of this modality's registered tokenizer (e.g. audio {seconds: 0.6}); the family "
        "reads no per-modality encoder or connector",
    )


@dataclass
class LLMConfig:
    path: str | None = _f(None, "folder of a Hugging Face causal LM; None = build from `config`")
    config: dict = _f({}, "Hugging Face config keys (with model_type) to build a fresh LLM")
    tokenizer: str | None = _f(None, "tokenizer folder; defaults to `path`")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "weights dtype")
    quantize: Literal["none", "nf4"] = _f(
        "none", "nf4: 4-bit weights through bitsandbytes on a CUDA GPU (set by train.finetune=qlora)"
    )


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank", ge=1)
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r)", ge=1)
    dropout: float = _f(0.05, "LoRA dropout", ge=0.0)
    targets: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names (last part) that get adapters, or [all-linear]; looked for only in the trained parts of `groups`",
    )
    groups: list[str] = _f(
        ["llm"], "groups that train through adapters (e.g. [llm, encoder.image]); other trained groups train fully"
    )
    dora: bool = _f(False, "weight-decomposed adapters (DoRA); set by train.finetune=dora")
    modules: list[str] = _f([], "the resolved full module names that carry adapters; written by training")


@dataclass
class FlamingoConfig:
    """The Flamingo family's Perceiver Resampler and gated cross-attention (model.family=flamingo)."""

    num_latents: int = _f(64, "learned latents per media item: the resampler's output length", ge=1)
    resampler_depth: int = _f(6, "Perceiver Resampler layers", ge=1)
    resampler_heads: int = _f(8, "resampler attention heads", ge=1)
    resampler_dim_head: int = _f(64, "width of each resampler head", ge=1)
    max_frames: int = _f(1, "frames per media item with a learned time embedding each (1: images, no time)", ge=1)
    cross_attn_every_n_layers: int = _f(1, "one gated cross-attention block per this many decoder layers", ge=1)
    xattn_placement: Literal["first", "last"] = _f(
        "first",
        "first: blocks before layers 0, n, 2n, ... (paper, IDEFICS) | last: before n-1, 2n-1, ... (OpenFlamingo)",
    )
    media_attention: Literal["immediate", "all"] = _f(
        "immediate", "text attends to the latents of the last media item before it (immediate) or of all before it"
    )
    xattn_heads: int = _f(8, "cross-attention heads", ge=1)
    xattn_dim_head: int = _f(64, "width of each cross-attention head", ge=1)
    ff_mult: int = _f(4, "feed-forward width multiple in the resampler and the cross-attention blocks", ge=1)
    activation: Literal["gelu", "relu"] = _f(
        "gelu", "activation of the resampler's feed-forward and of an `mlp` block feed-forward (IDEFICS: relu)"
    )
    qk_norm: bool = _f(False, "layer-norm the resampler's queries and keys (an IDEFICS option)")
    # The IDEFICS variant of the block (HF IdeficsGatedCrossAttentionLayer): options, not a second module.
    xattn_norm: Literal["layernorm", "rmsnorm"] = _f(
        "layernorm", "norm before the blocks' attention and feed-forward (paper, OpenFlamingo: layernorm; IDEFICS rms)"
    )
    xattn_norm_eps: float = _f(1e-5, "epsilon of those norms", gt=0.0)
    xattn_ff: Literal["mlp", "swiglu"] = _f(
        "mlp", "the blocks' feed-forward: mlp (Linear-act-Linear) or swiglu (SiLU-gated, as IDEFICS and Llama)"
    )
    xattn_ff_dim: int = _f(0, "inner width of the blocks' feed-forward; 0: ff_mult x the LM's width", ge=0)
    xattn_qk_norm: bool = _f(False, "normalise each head's queries and keys in the blocks (IDEFICS qk_layer_norms)")
    xattn_gate: Literal["scalar", "vector"] = _f(
        "scalar", "tanh gates: one scalar per block (paper) or one per hidden unit (IDEFICS alpha_type=vector)"
    )


@dataclass
class OneLLMConfig:
    """The OneLLM family: modality tokenizers -> one universal encoder -> the universal projection module (UPM)."""

    encoder: EncoderConfig = _f(
        EncoderConfig(feature_layer=-1, keep_cls=True),
        "the universal encoder shared by every modality: an image tower (clip | siglip; `path` or a preset)",
    )
    num_experts: int = _f(3, "projection experts, mixed per token by each modality's router", ge=1)
    num_queries: int = _f(30, "learned query tokens per modality: tokens each input gives the LLM (plus 2 tags)", ge=1)
    expert_depth: int = _f(1, "transformer layers per expert (bidirectional)", ge=1)
    expert_heads: int = _f(4, "attention heads in the experts", ge=1)
    router_hidden: int = _f(0, "hidden width of each router MLP; 0: 4 x the encoder width", ge=0)
    router: Literal["softmax", "sigmoid"] = _f(
        "softmax", "router weights: softmax over experts (paper) | sigmoid then normalised to sum 1 (released code)"
    )
    route_on: Literal["tokens", "queries"] = _f(
        "tokens",
        "what the router reads: each query plus the mean input token (weights follow the input, as the paper) | "
        "the bare queries (one set of weights per modality, as OneLLM's released code)",
    )
    tokenizers: str | None = _f(
        None,
        "a folder of <modality>.safetensors tokenizer weights to start from (the onellm quickstart's stage 0 binds "
        "each tokenizer to text and writes base/tokenizers); modalities without a file start random",
    )
    queries: Literal["learned", "pooled"] = _f(
        "learned",
        "query tokens: learned vectors alone (OneLLM) | learned plus the mean of their own stretch of input tokens "
        "(adaptive average pooling), so each query starts out reading one place or moment of the input",
    )


@dataclass
class ModelConfig:
    family: str = _f(
        "projector",
        "alignment family: projector (LLaVA-style early fusion) | flamingo (Perceiver Resampler + gated "
        "cross-attention) | onellm (modality tokenizers, one universal encoder, projection experts + router)",
    )
    media: dict[str, MediaConfig] = _f(
        {"image": MediaConfig()}, "per modality (image, audio, ...): its encoder(s) and connector"
    )
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoraConfig | None = _f(
        None, "LoRA adapters the LLM carries; written by training when train.finetune=lora, not set by hand"
    )
    flamingo: FlamingoConfig = field(
        default_factory=FlamingoConfig, metadata={"help": "resampler and cross-attention settings (family=flamingo)"}
    )
    onellm: OneLLMConfig = field(
        default_factory=OneLLMConfig, metadata={"help": "universal encoder and projection settings (family=onellm)"}
    )


@dataclass
class MediaLimits:
    """Largest media a sample may carry, checked from a file's header before its payload is decoded where the format
    allows: a corrupt or hostile file (a decompression bomb) fails as a bad sample instead of exhausting memory."""

    max_image_pixels: int = _f(40_000_000, "largest image (width x height), from the header before decoding", ge=1)
    max_audio_seconds: float = _f(600.0, "longest audio clip in seconds, from the header before decoding", gt=0.0)
    max_video_frames: int = _f(1024, "most frames in a video; decoding stops past it", ge=1)
    max_points: int = _f(1_000_000, "most points in a point cloud (a PLY's from its header)", ge=1)


@dataclass
class DataConfig:
    train: str | list[str] = _f(
        "", "LLaVA-format JSON/JSONL for training, or a list of them mixed into one set (`[a.json,b.jsonl]`)"
    )
    train_fractions: list[float] = _f(
        [], "share of each train file used, one per file (0.25: a seeded quarter; 2: two passes); empty: all of each"
    )
    val: str | None = _f(None, "LLaVA-format JSON/JSONL for validation loss")
    image_folder: str = _f("", "folder that media paths (`image`, `audio`, ...) are relative to")
    template: Literal["plain", "chat"] = _f(
        "chat", "plain (stage 1: media then caption) | chat (the tokenizer's chat template)"
    )
    chat_template: str | None = _f(
        None, "Jinja chat template replacing the tokenizer's (for LLMs that ship none); saved with the checkpoint"
    )
    max_length: int = _f(512, "longest tokenized sample, media tokens included", ge=1)
    on_error: Literal["skip", "raise"] = _f(
        "skip", "bad sample: skip (count and go on) | raise (save a checkpoint, then stop)"
    )
    max_skip_fraction: float = _f(0.1, "stop when more than this fraction of samples seen were skipped", ge=0.0)
    num_workers: int = _f(0, "DataLoader worker processes", ge=0)
    stream: bool = _f(
        False,
        "read data.train as shards (.jsonl, or .tar carrying their media; files, folders or globs), one at a time "
        "in a seeded order: data larger than memory, resumable mid-shard. Make shards with `mmalign shard`",
    )
    group_by_length: bool = _f(
        False, "batch samples of similar token length and the same modalities together: less padding, same samples"
    )
    group_by_modality: bool = _f(
        False,
        "every batch holds samples of one modality layout (all video, all audio+image, ...), drawn in random order "
        "otherwise: one encoder call per batch instead of one per modality in it (group_by_length implies it)",
    )
    pack_length: int = _f(
        0,
        "pack each batch's samples into rows of at most this many tokens (positions restart per sample, no attention "
        "across samples); 0 = one sample per row. Early-fusion families (projector, onellm) only",
        ge=0,
    )
    blank_media_prob: float = _f(
        0.0,
        "chance a training media item is replaced by zeros (modality dropout: blind questions get prior answers)",
        ge=0.0,
    )
    limits: MediaLimits = field(
        default_factory=MediaLimits, metadata={"help": "media size limits; a sample over one fails naming the key"}
    )


@dataclass
class TrainConfig:
    out_dir: str = _f("runs/train", "where checkpoints and logs go")
    trainable: list[str] = _f(
        ["connector"],
        "what trains: groups by name or prefix (encoder, encoder.image, connector, llm) or layer ranges "
        "(llm.layers[-4:], encoder.image.layers[:6]); all else is frozen",
    )
    finetune: Literal["full", "lora", "dora", "qlora"] = _f(
        "full", "how train.lora.groups train: full | lora | dora | qlora (4-bit LLM, CUDA + bitsandbytes)"
    )
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "adapter settings (train.finetune)"})
    init_from: str | None = _f(None, "checkpoint whose weights initialise this run (e.g. the stage-1 connector)")
    lr: float = _f(1e-3, "peak learning rate", gt=0.0)
    connector_lr: float | None = _f(None, "learning rate for the connector group; None = lr", gt=0.0)
    group_lr: dict[str, float] = _f(
        {}, "peak learning rate per group or prefix, e.g. {encoder: 2e-6, connector: 1e-3}; the longest match wins"
    )
    layer_decay: float = _f(
        1.0, "layer-wise lr decay: a parameter d levels below its group's top trains at lr * decay^d; 1 = none", gt=0.0
    )
    weight_decay: float = _f(0.0, "AdamW weight decay (never on biases, norms or other 1-D parameters)", ge=0.0)
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    warmup_ratio: float = _f(0.03, "fraction of steps with linear warm-up before the cosine decay", ge=0.0)
    epochs: float = _f(1.0, "passes over the training data (used when max_steps is 0)", gt=0.0)
    max_steps: int = _f(0, "optimizer steps; 0 = from epochs", ge=0)
    batch_size: int = _f(16, "samples per micro-batch", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", ge=1)
    clip_grad: float = _f(1.0, "max gradient norm; 0 disables", ge=0.0)
    precision: Literal["auto", "bf16", "fp32"] = _f(
        "auto", "auto (bf16 autocast where the hardware has it) | bf16 | fp32"
    )
    activation_checkpointing: bool = _f(
        False, "recompute each block's activations in backward (LLM and encoder stacks): less memory, more compute"
    )
    distributed: Literal["ddp", "fsdp"] = _f(
        "ddp", "under torchrun: ddp (a full copy per process) | fsdp (FSDP2: parameters, gradients, optimizer sharded)"
    )
    seed: int = _f(0, "seed for init, data order and dropout")
    eval_every: int = _f(0, "steps between validation passes; 0 = only at the end", ge=0)
    save_every: int = _f(0, "steps between resumable checkpoints; 0 = only at the end", ge=0)
    log_every: int = _f(10, "steps between log lines in metrics.jsonl", ge=0)
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    progress: bool = _f(True, "show a progress bar")
    tensorboard: bool = _f(
        False, "also log to TensorBoard under out_dir/tensorboard (pip install 'mmalign[tensorboard]')"
    )


@dataclass
class StageConfig:
    """One stage of a curriculum: its data, what it trains (all else frozen) and how long. Each stage starts from
    the previous stage's checkpoint and writes its own under train.out_dir/<number>-<name>."""

    name: str = _f("stage", "the stage's name (its run folder is train.out_dir/<number>-<name>)")
    data: list[str] = _f([], "this stage's training files (LLaVA JSON/JSONL)")
    replay: float = _f(
        0.0, "earlier stages' data mixed in, as a share of this stage's sample count (a seeded subset)", ge=0.0
    )
    trainable: list[str] = _f([], "parameter groups this stage trains, all others frozen; empty: train.trainable")
    epochs: float | None = _f(None, "passes over this stage's data (replay included); None: train.epochs", gt=0.0)
    lr: float | None = _f(None, "peak learning rate; None: train.lr", gt=0.0)
    overrides: list[str] = _f([], "any other key=value for this stage only (e.g. train.batch_size=32)")


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = _f(
        [], "a curriculum: stages run in order, each from the last one's weights (data.train is then unused)"
    )


# --------------------------------------------------------------------------------------------- (de)serialising


class ConfigError(ValueError):
    """A config key with a value it cannot take; the message names the key and what is allowed."""


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _optional_inner(hint: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _item_hint(hint: Any) -> Any:
    """The value type of a `list[X]` or `dict[str, X]` hint (Any for a bare list or dict)."""
    args = typing.get_args(_optional_inner(hint))
    return args[-1] if args else Any


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and bad values by name."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], f"{where}{f.name}")
            _check_limits(kwargs[f.name], f, f"{where}{f.name}")
    return cls(**kwargs)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check a parsed value against a type hint, converting where the intent is clear."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for t in args:
            if t is not type(None):
                try:
                    return _convert(value, t, key)
                except (ConfigError, KeyError) as err:
                    errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(f"config key {key}={value!r}: expected {hint}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}={value!r}: expected a mapping of {hint.__name__} keys")
        return from_dict(hint, value, f"{key}.")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key {key}={value!r}: choose one of {', '.join(repr(a) for a in args)}")
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key}={value!r}: expected a list")
        return [_convert(v, _item_hint(hint), f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}={value!r}: expected a mapping")
        return {k: _convert(v, _item_hint(hint), f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "2e-5" as a string; Python reads it as the float it is
            return float(value)
        except (TypeError, ValueError):
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and value is not None and not isinstance(value, dict | list):
        return value if isinstance(value, str) else str(value)
    raise ConfigError(f"config key {key}={value!r}: expected {getattr(hint, '__name__', hint)}")


def _check_limits(value: Any, f: dataclasses.Field, key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    if "ge" in f.metadata and value < f.metadata["ge"]:
        raise ConfigError(f"config key {key}={value!r}: must be >= {f.metadata['ge']}")
    if "gt" in f.metadata and value <= f.metadata["gt"]:
        raise ConfigError(f"config key {key}={value!r}: must be > {f.metadata['gt']}")


def load_yaml(path: str | Path, cls: type = RecipeConfig) -> Any:
    with open(path) as fh:
        return from_dict(cls, yaml.safe_load(fh) or {})


def save_yaml(cfg: Any, path: str | Path) -> None:
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)


def _is_text(hint: Any) -> bool:
    """A string field (or a choice of strings): the override's text is kept as typed, since YAML would turn
    `1.10` into 1.1 and `no` into False."""
    hint = _optional_inner(hint)
    if typing.get_origin(hint) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(hint))
    return hint is str


def _parse(text: str, hint: Any, key: str) -> Any:
    value = yaml.safe_load(text)
    if _is_text(hint) and not (value is None and _optional_inner(hint) is not hint):
        value = text
    return _convert(value, hint, key)


def _child(node: Any, hint: Any, name: str, key: str) -> tuple[Any, Any]:
    """Step from `node` (a dataclass, dict or list, whose type hint is `hint`) to its part `name`, creating
    missing dict entries, list slots and optional sections with their defaults."""
    if dataclasses.is_dataclass(node):
        if name not in {f.name for f in dataclasses.fields(node)}:
            raise KeyError(f"unknown config key {key!r}")
        child_hint = typing.get_type_hints(type(node))[name]
        if getattr(node, name) is None and dataclasses.is_dataclass(_optional_inner(child_hint)):
            setattr(node, name, _optional_inner(child_hint)())
        return getattr(node, name), child_hint
    item = _item_hint(hint)
    if isinstance(node, dict):
        if name not in node:
            node[name] = item() if dataclasses.is_dataclass(item) else {}
        return node[name], item
    if isinstance(node, list):
        if not name.isdigit() or int(name) > len(node):
            raise KeyError(f"config key {key!r}: {name!r} is not an index of a {len(node)}-item list")
        if int(name) == len(node):
            node.append(item() if dataclasses.is_dataclass(item) else None)
        return node[int(name)], item
    raise KeyError(f"unknown config key {key!r}")


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `a.b.c=value` strings in place; unknown keys, wrong types and values out of range are errors that
    name the key. Dict entries and list items are reached by name and index (`model.media.image.encoder.path`,
    `model.media.image.extra_encoders.0.name`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
        key, text = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node, hint = cfg, type(cfg)
        for p in parents:
            node, hint = _child(node, hint, p, key)
        if dataclasses.is_dataclass(node):
            fields = {f.name: f for f in dataclasses.fields(node)}
            if leaf not in fields:
                raise KeyError(f"unknown config key {key!r}")
            value = _parse(text, typing.get_type_hints(type(node))[leaf], key)
            _check_limits(value, fields[leaf], key)
            setattr(node, leaf, value)
        elif isinstance(node, dict):
            node[leaf] = _parse(text, _item_hint(hint), key)
        elif isinstance(node, list):
            _child(node, hint, leaf, key)  # checks the index, appends a slot at the end
            node[int(leaf)] = _parse(text, _item_hint(hint), key)
        else:
            raise KeyError(f"unknown config key {key!r}")
    return cfg


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a recipe shipped in mmalign/recipes (e.g. `shapes_stage1`)."""
    from importlib import resources

    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = resources.files("mmalign") / "recipes" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    known = sorted(p.name.removesuffix(".yaml") for p in (resources.files("mmalign") / "recipes").iterdir())
    raise FileNotFoundError(f"no recipe file {name_or_path!r} and no shipped recipe of that name; shipped: {known}")


def load_recipe(name_or_path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    """A recipe by path or shipped name, with `key=value` overrides applied and cross-key checks made."""
    cfg = apply_overrides(load_yaml(resolve_recipe(name_or_path)), list(overrides))
    check_recipe(cfg)
    return cfg


def check_recipe(cfg: RecipeConfig) -> None:
    """Checks across keys that no single field can make."""
    t = cfg.train
    if cfg.model.lora is not None and t.finetune == "full":
        raise ConfigError(
            "model.lora is set but train.finetune is 'full': adapters would be built and their groups trained in "
            "full anyway; set train.finetune=lora (adapter settings live in train.lora) or model.lora=null"
        )
    if t.finetune != "full":
        from mmalign.models.layers import parse_selector, under

        picked = [parse_selector(s).group for s in t.trainable]
        adapted = [parse_selector(g, "train.lora.groups").group for g in t.lora.groups]
        overlap = [g for g in picked for a in adapted if under(g, a) or under(a, g)]
        if not overlap:
            raise ConfigError(
                f"train.finetune={t.finetune} adapts train.lora.groups={t.lora.groups}, but train.trainable="
                f"{t.trainable} trains none of them"
            )
    if not cfg.model.media:
        raise ConfigError("model.media is empty: name at least one modality (e.g. image)")
    d = cfg.data
    if d.stream and d.train_fractions:
        raise ConfigError("data.train_fractions: not with data.stream=true; shards are read whole, once per epoch")
    if d.pack_length and cfg.model.family == "flamingo":
        raise ConfigError(
            "data.pack_length: the flamingo family attends to each row's media by cross-attention, so samples "
            "cannot share a row; set data.pack_length=0 (data.group_by_length=true also cuts padding)"
        )
    if 0 < d.pack_length < d.max_length:
        raise ConfigError(
            f"data.pack_length={d.pack_length} is below data.max_length={d.max_length}: the longest samples would "
            "fit no row; raise pack_length or lower max_length"
        )


def describe(cls: type = RecipeConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf key: the table behind `mmalign train --help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        item = _item_hint(hint)
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
            continue
        if typing.get_origin(hint) is dict and dataclasses.is_dataclass(item):
            rows += describe(item, f"{prefix}{f.name}.<modality>.")
            continue
        if typing.get_origin(hint) is list and dataclasses.is_dataclass(item):
            rows.append((prefix + f.name, "[]", f.metadata.get("help", "")))
            rows += describe(item, f"{prefix}{f.name}.<n>.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if typing.get_origin(_optional_inner(hint)) is Literal:
            help_text += f" (one of {', '.join(typing.get_args(_optional_inner(hint)))})"
        rows.append((prefix + f.name, repr(default), help_text))
    return rows


# Keys (or prefixes) a resumed run may change: how often it evaluates, saves and logs, how it shows progress, and
# what it does with bad samples (a run stopped by one may resume with a raised limit). Everything else (rates,
# batch size, steps, data, model) shapes the optimisation a resumed run must continue exactly.
RESUME_MAY_CHANGE = (
    "train.eval_every",
    "train.save_every",
    "train.log_every",
    "train.progress",
    "train.tensorboard",
    "train.device",
    "data.num_workers",
    "data.on_error",
    "data.max_skip_fraction",
    "data.limits",
)


def flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested dict (lists are leaves)."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out |= flat(value, f"{prefix}{key}.")
    return out


def resume_changes(saved: RecipeConfig, now: RecipeConfig) -> list[str]:
    """Check a resumed run's config against the one it started with. Returns the allowed changes as
    "key: old -> new" lines; raises ConfigError naming every key that may not change mid-run."""
    before, after = flat(to_dict(saved)), flat(to_dict(now))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    fixed = [k for k in changed if not any(k == m or k.startswith(m + ".") for m in RESUME_MAY_CHANGE)]
    if fixed:
        detail = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in fixed)
        raise ConfigError(
            f"--resume: {detail}. These cannot change in the middle of a run (the optimizer, schedule and data "
            "position were saved for the old values): put them back, or start a new run in another train.out_dir"
        )
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed]
