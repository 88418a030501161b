"""The chunked LM-head cross-entropy against the plain one: the same loss and the same gradients."""

import pytest
import torch
import torch.nn.functional as F

import mmalign.models.head_loss as head_loss
from mmalign.models.head_loss import head_cross_entropy


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows, so a call runs several and their sums must add up."""
    monkeypatch.setattr(head_loss, "MIN_ROWS", 1)
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 3 * 4 * 50)


def _tensors(dtype=torch.float32, n=11, dim=8, vocab=50):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return {
        "hidden": make(n, dim),
        "weight": make(vocab, dim),
        "bias": make(vocab),
        "rows": make(3, dim),
        "rows_bias": make(3),
        "ids": torch.tensor([4, 17, 49]),
        "targets": torch.cat([torch.tensor([4, 17, 49]), torch.randint(0, vocab, (n - 3,), generator=g)]),
    }


def _reference(t, with_rows=True):
    """The logits written out in full, the replaced columns copied in, then F.cross_entropy."""
    logits = F.linear(t["hidden"], t["weight"], t["bias"])
    if with_rows:
        logits = logits.index_copy(1, t["ids"], F.linear(t["hidden"], t["rows"], t["rows_bias"]))
    return F.cross_entropy(logits.float(), t["targets"], reduction="sum")


@pytest.mark.parametrize("with_rows", [True, False])
def test_loss_and_every_gradient_match_the_full_logits(small_chunks, with_rows):
    t = _tensors()
    names = ["hidden", "weight", "bias"] + (["rows", "rows_bias"] if with_rows else [])
    rows = (t["ids"], t["rows"], t["rows_bias"]) if with_rows else None
    mine = head_cross_entropy(t["hidden"], t["weight"], t["targets"], t["bias"], rows=rows)
    ref = _reference(t, with_rows)
    torch.testing.assert_close(mine, ref)
    # A scaled loss (a mean, a task weight) scales every gradient: backward must use its incoming gradient.
    expected = torch.autograd.grad(0.37 * ref, [t[k] for k in names])
    got = torch.autograd.grad(0.37 * mine, [t[k] for k in names])
    for name, a, b in zip(names, got, expected, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    if with_rows:  # the replaced columns take nothing from the LM's own rows
        assert got[1][t["ids"]].abs().max() == 0 and got[2][t["ids"]].abs().max() == 0


def test_frozen_head_gives_gradients_only_where_asked(small_chunks):
    t = _tensors()
    weight = t["weight"].detach()
    loss = head_cross_entropy(t["hidden"], weight, t["targets"], rows=(t["ids"], t["rows"], None))
    loss.backward()
    assert weight.grad is None
    logits = F.linear(t["hidden"], weight).index_copy(1, t["ids"], F.linear(t["hidden"], t["rows"]))
    hidden_grad, rows_grad = torch.autograd.grad(
        F.cross_entropy(logits, t["targets"], reduction="sum"), [t["hidden"], t["rows"]]
    )
    torch.testing.assert_close(t["hidden"].grad, hidden_grad)
    torch.testing.assert_close(t["rows"].grad, rows_grad)


def test_no_grad_gives_the_same_loss_and_no_graph(small_chunks):
    t = _tensors()
    with torch.no_grad():
        loss = head_cross_entropy(t["hidden"], t["weight"], t["targets"], t["bias"])
    assert not loss.requires_grad
    torch.testing.assert_close(
        loss, F.cross_entropy(F.linear(t["hidden"], t["weight"], t["bias"]), t["targets"], reduction="sum")
    )


def test_bfloat16_matches_the_float_reference(small_chunks):
    t = _tensors(torch.bfloat16)
    loss = head_cross_entropy(
        t["hidden"], t["weight"], t["targets"], t["bias"], rows=(t["ids"], t["rows"], t["rows_bias"])
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, _reference(t), rtol=2e-2, atol=0.5)
    loss.backward()
    assert t["hidden"].grad.dtype == torch.bfloat16 and t["rows"].grad.dtype == torch.bfloat16


def test_bad_shapes_are_refused():
    t = _tensors()
    with pytest.raises(ValueError, match="targets"):
        head_cross_entropy(t["hidden"], t["weight"], t["targets"][:-1])


def test_under_autocast_the_products_run_in_its_dtype_and_float32_weights_get_float32_gradients(small_chunks):
    t = _tensors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_cross_entropy(t["hidden"], t["weight"], t["targets"], t["bias"], rows=(t["ids"], t["rows"], None))
        logits = F.linear(t["hidden"], t["weight"], t["bias"])  # what the plain head computes under autocast
        logits = logits.index_copy(1, t["ids"], F.linear(t["hidden"], t["rows"], t["bias"][t["ids"]]))
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(
        loss, F.cross_entropy(logits.float(), t["targets"], reduction="sum"), rtol=1e-3, atol=1e-2
    )
    loss.backward()
    assert t["weight"].grad.dtype == torch.float32 and t["rows"].grad.dtype == torch.float32
