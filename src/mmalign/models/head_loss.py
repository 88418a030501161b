"""The LM head and its cross-entropy in one pass over chunks of rows, for training.

`F.cross_entropy(F.linear(hidden, W), targets)` builds the (N, V) logits, a log-softmax copy of them, and in
backward a zero-filled (N, V) gradient and the logits' gradient: four N x V float tensors (70 MB each for 541 rows
and a 32k vocabulary), each written once and read once, each a fresh allocation (on CPU its first touch costs a
page fault per 4 KiB; on GPU they are the step's peak memory). The gradient of a softmax cross-entropy with
respect to its logits is known as soon as the logits are (softmax - one-hot), so this computes the loss and the
gradients of the hidden states and of the head's trainable tensors chunk by chunk in one reused buffer, in the
forward pass; backward only scales them by the incoming gradient. The matrix products are the same ones, so the
result is the reference's to rounding.

A head may have a few of its output rows replaced (`rows`, the Flamingo family's trainable `<image>` and
`<|endofchunk|>` rows over a frozen LM): those columns of the logits come from the replacement rows instead.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 64 * 2**20  # the logits buffer's size, unless that leaves under MIN_ROWS rows
MIN_ROWS = 256  # fewer rows per product run well below the matmul's speed on CPU (measured: 4 MB chunks, 1.8x slower)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ids, rows, rows_bias, want_grad):
        n, vocab = hidden.shape[0], weight.shape[0]
        need = [want_grad and t is not None and t.requires_grad for t in (hidden, weight, bias, rows, rows_bias)]
        g_hidden = torch.empty_like(hidden) if need[0] else None  # every row is written
        g_weight, g_bias, g_rows, g_rows_bias = (
            torch.zeros_like(t, dtype=torch.float32) if want else None  # sums over chunks, kept in float32
            for t, want in zip((weight, bias, rows, rows_bias), need[1:], strict=True)
        )
        most = max(MIN_ROWS, CHUNK_BYTES // (4 * vocab))
        chunk = -(-n // -(-n // most)) if n else 1  # equal chunks: 541 rows go as 271 + 270, not 524 + 17
        buf = torch.empty(chunk, vocab, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]  # (m, D), (m,)
            m = h.shape[0]
            if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
                logits = torch.mm(h, weight.t(), out=buf[:m])  # (m, V)
            else:
                logits = buf[:m].copy_(h @ weight.t())
            if bias is not None:
                logits += bias
            if ids is not None:
                new = h @ rows.to(h.dtype).t()  # (m, k)
                logits[:, ids] = (new if rows_bias is None else new + rows_bias).float()
            picked = logits.gather(1, t[:, None])  # (m, 1) the target's logit, read before the buffer turns into p
            top = logits.amax(1, keepdim=True)  # (m, 1)
            total = logits.sub_(top).exp_().sum(1, keepdim=True)  # (m, 1) the buffer now holds exp(logit - top)
            loss += (top + total.log() - picked).sum()
            if not any(need):
                continue
            p = logits.div_(total)  # (m, V) softmax
            p[torch.arange(m, device=p.device), t] -= 1  # d loss / d logits = softmax - one-hot
            if ids is not None:
                p_new = p[:, ids]  # (m, k): these columns' gradient goes to the replacement rows
                p[:, ids] = 0
            if need[0]:
                g_hidden[start : start + m] = p.to(weight.dtype) @ weight
                if ids is not None:  # through a replaced column the gradient reads the replacement row
                    g_hidden[start : start + m] += p_new.to(rows.dtype) @ rows
            if need[1]:
                g_weight.addmm_(p.t(), h.float())
            if need[2]:
                g_bias += p.sum(0)
            if need[3]:
                g_rows.addmm_(p_new.t(), h.float())
            if need[4]:
                g_rows_bias += p_new.sum(0)
        ctx.grads = (g_hidden, g_weight, g_bias, g_rows, g_rows_bias)
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias, rows, rows_bias)]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [
            None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes, strict=True)
        ]
        ctx.grads = None  # backward runs once: free the (V, D) sums now
        g_hidden, g_weight, g_bias, g_rows, g_rows_bias = grads
        return g_hidden, g_weight, g_bias, None, None, g_rows, g_rows_bias, None


def head_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of the LM head's logits `hidden @ weight.T + bias` (N, V) against `targets` (N,).

    `rows`: (ids (k,), replacement rows (k, D), their bias (k,) or None): logits columns `ids` come from these
    rows instead of `weight`'s. Every target must be a real class id (drop ignored positions before calling).
    Gradients flow to whichever of hidden, weight, bias and the replacement rows require them."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (N, D) and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    ids, new_rows, new_bias = rows if rows is not None else (None, None, None)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # The products run in autocast's dtype, as F.linear would under it; the casts are autograd's, so float32
        # weights get float32 gradients. Inside, autocast is off: the buffer is float32 and is written with out=.
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        new_rows = None if new_rows is None else new_rows.to(dtype)
    want_grad = torch.is_grad_enabled()
    with torch.autocast(device, enabled=False):
        return _HeadCrossEntropy.apply(hidden, weight, bias, targets, ids, new_rows, new_bias, want_grad)
