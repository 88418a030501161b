"""Which parameters train: decided once, by the model's declared groups and layer ranges, before the optimizer is
built."""

from __future__ import annotations

from torch import nn

from mmalign.models.layers import select


def select_groups(model: nn.Module, names: list[str], key: str = "train.trainable") -> list[str]:
    """The declared groups that selectors touch: a name selects every group it equals or is a dotted prefix of
    (`encoder` selects `encoder.image` and `encoder.audio`). A name that selects nothing is an error."""
    return list(select(model, names, key))


def group_of(model: nn.Module) -> dict[str, str]:
    """{parameter name: its group} for every parameter (tied weights under their first name)."""
    by_id = {id(p): group for group, module in model.param_groups().items() for p in module.parameters()}
    return {name: by_id[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if id(p) in by_id}


def set_trainable(model: nn.Module, trainable: list[str], adapted: list[str] = ()) -> None:
    """Freeze everything, then unfreeze what `trainable` selects (groups or layer ranges). In the `adapted` groups
    only the LoRA adapters of the selected parts train (they must already be injected)."""
    model.requires_grad_(False)
    adapted_groups = select(model, list(adapted), "train.lora.groups") if adapted else {}
    for group, modules in select(model, trainable).items():
        for module in modules:
            if group in adapted_groups:
                for name, p in module.named_parameters():
                    p.requires_grad = "lora_" in name
            else:
                module.requires_grad_(True)


def count_parameters(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{group: (trainable, total)}: the table every run prints."""
    out = {}
    for group, module in model.param_groups().items():
        params = list(module.parameters())
        out[group] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    return out


def trainable_table(model: nn.Module, optimizer_groups: list[dict]):
    """A rich table: per declared group, trainable / total parameters, the layers that train and the peak lr."""
    from rich.table import Table

    from mmalign.models.layers import layer_stack

    lrs: dict[str, list[float]] = {}
    for g in optimizer_groups:
        lrs.setdefault(g.get("group", ""), []).append(g.get("initial_lr", g["lr"]))
    table = Table(title="parameters", title_justify="left")
    for column in ("group", "trainable", "total", "layers trained", "peak lr"):
        table.add_column(column, justify="left" if column in ("group", "layers trained") else "right")
    for group, module in model.param_groups().items():
        params = list(module.parameters())
        trained = sum(p.numel() for p in params if p.requires_grad)
        stack = layer_stack(module)
        if not trained:
            layers = "frozen"
        elif stack is None:
            layers = "all"
        else:
            on = [i for i, block in enumerate(stack) if any(p.requires_grad for p in block.parameters())]
            layers = "all" if len(on) == len(stack) else f"{compress(on)} of {len(stack)}"
        rates = lrs.get(group, [])
        rate = f"{min(rates):.1e}-{max(rates):.1e}" if rates else ""
        if rates and min(rates) == max(rates):
            rate = f"{rates[0]:.2e}"
        table.add_row(group, f"{trained:,}", f"{sum(p.numel() for p in params):,}", layers, rate)
    return table


def compress(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def module_patterns(names: list[str]) -> list[str]:
    """Adapter targets, shortened: layer numbers folded into ranges (`llm.model.layers.{0-3}.self_attn.q_proj`)."""
    import re

    folded: dict[str, list[int]] = {}
    for name in names:
        match = re.search(r"\.(\d+)\.", name)
        if match is None:
            folded.setdefault(name, [])
            continue
        key = name[: match.start()] + ".{}." + name[match.end() :]
        folded.setdefault(key, []).append(int(match.group(1)))
    return [key.replace("{}", "{" + compress(sorted(set(ix))) + "}") if ix else key for key, ix in folded.items()]
