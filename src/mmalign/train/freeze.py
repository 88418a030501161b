"""Which parameters train: decided once, by named groups, before the optimizer is built."""

from __future__ import annotations

from mmalign.models.multimodal import MultimodalLM

GROUPS = ("encoder", "connector", "llm")


def set_trainable(model: MultimodalLM, trainable: list[str], finetune: str = "full") -> None:
    """Freeze everything, then unfreeze the named groups. With finetune=lora the LLM trains only its adapters
    (the LLM must already be wrapped by PEFT)."""
    unknown = set(trainable) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown trainable group(s) {sorted(unknown)}; groups: {', '.join(GROUPS)}")
    if finetune not in ("full", "lora"):
        raise ValueError(f"finetune must be full or lora, got {finetune!r}")
    model.requires_grad_(False)
    for group in trainable:
        module = getattr(model, group)
        if group == "llm" and finetune == "lora":
            for name, p in module.named_parameters():
                p.requires_grad = "lora_" in name
        else:
            module.requires_grad_(True)


def count_parameters(model: MultimodalLM) -> dict[str, tuple[int, int]]:
    """{group: (trainable, total)}."""
    out = {}
    for group in GROUPS:
        params = list(getattr(model, group).parameters())
        out[group] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    return out
