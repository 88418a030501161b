"""Batched KV-cache generation: equals step-by-step full recomputation, left padding changes nothing, stop tokens
end a row, sampling is reproducible under a seed."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model_config
from mmalign.generate import generate
from mmalign.models.builder import build_model


@pytest.fixture()
def setup(shapes):
    model, tok = build_model(tiny_model_config(shapes["tokenizer"]))
    model.eval()
    n = model.encoders["image"].num_tokens
    prompts = [
        [2, 6] + [model.media_token_ids["image"]] * n + [10, 11, 12, 7],
        [2, 6] + [model.media_token_ids["image"]] * n + [13, 7],
        [2, 6] + [model.media_token_ids["image"]] * n + [14, 15, 16, 17, 18, 19, 7],
    ]
    pixels = torch.randn(3, 3, 32, 32)
    return model, tok, prompts, pixels


def reference_greedy(model, prompt, pixels, steps):
    """No cache, no padding: recompute the whole sequence for every new token."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, media={"image": pixels})["logits"]
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_cached_batched_greedy_equals_reference(setup):
    model, tok, prompts, pixels = setup
    got = generate(model, prompts, {"image": pixels}, pad_id=tok.pad_token_id, stop_ids=[-1], max_new_tokens=6)
    for i, prompt in enumerate(prompts):
        assert got[i] == reference_greedy(model, prompt, pixels[i : i + 1], 6)


def test_left_padding_does_not_change_answers(setup):
    model, tok, prompts, pixels = setup
    batched = generate(model, prompts, {"image": pixels}, pad_id=tok.pad_token_id, stop_ids=[-1], max_new_tokens=5)
    single = [
        generate(model, [p], {"image": pixels[i : i + 1]}, pad_id=tok.pad_token_id, stop_ids=[-1], max_new_tokens=5)[0]
        for i, p in enumerate(prompts)
    ]
    assert batched == single


def test_stop_token_ends_a_row(setup):
    model, tok, prompts, pixels = setup
    free = generate(model, prompts, {"image": pixels}, pad_id=tok.pad_token_id, stop_ids=[-1], max_new_tokens=6)
    stop = free[0][2]
    got = generate(model, prompts, {"image": pixels}, pad_id=tok.pad_token_id, stop_ids=[stop], max_new_tokens=6)
    assert got[0] == free[0][: free[0].index(stop)]
    assert stop not in got[0]


def test_sampling_is_seeded(setup):
    model, tok, prompts, pixels = setup
    kw = dict(pad_id=tok.pad_token_id, stop_ids=[-1], max_new_tokens=8, temperature=1.5, top_p=0.95)
    a = generate(model, prompts, {"image": pixels}, seed=1, **kw)
    b = generate(model, prompts, {"image": pixels}, seed=1, **kw)
    c = generate(model, prompts, {"image": pixels}, seed=2, **kw)
    assert a == b
    assert a != c


@pytest.mark.parametrize("room", [None, 0, 1, 3], ids=["default", "dynamic-cache", "static-1", "static-3"])
def test_cached_left_padded_logits_equal_full_recomputation(setup, room):
    """prefill + step on left-padded rows give the logits of running each whole sequence unpadded: a decode position
    off by one changes them even where it leaves an untrained model's argmax alone. Both caches: the growing one
    (room=0, and prefill's default) and the one preallocated for `room` new tokens, which refuses one more."""
    from mmalign.generate import left_pad

    model, tok, prompts, pixels = setup
    ids, mask = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        logits, state = model.prefill(ids, mask, {"image": pixels}, *([] if room is None else [room]))
        steps = [logits]
        follow = torch.tensor([[21, 22, 23]] * len(prompts))[:, : room or 3]  # tokens appended one at a time
        for t in range(follow.shape[1]):
            steps.append(model.step(state, follow[:, t]))
        for i, prompt in enumerate(prompts):
            full = torch.tensor([prompt + follow[i].tolist()])
            expected = model(full, media={"image": pixels[i : i + 1]})["logits"][0, len(prompt) - 1 :]
            got = torch.stack([s[i] for s in steps])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        if room:
            full = rf"^the decode state is full: prefill sized it for {ids.shape[1] + room} tokens in all \(prompt \+ "
            with pytest.raises(ValueError, match=full + r"max_new_tokens\); pass prefill a larger max_new_tokens$"):
                model.step(state, follow[:, 0])


def test_top_p_keeps_the_smallest_set_that_reaches_p_and_resamples_within_it():
    from mmalign.generate import _pick

    probs = torch.tensor([[0.04, 0.5, 0.06, 0.3, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    logits = probs.log().repeat(2000, 1)  # rows alternate: a peaked distribution, a flat one
    g = torch.Generator().manual_seed(0)

    def draws(top_p, temperature=1.0):
        return _pick(logits, temperature, top_p, g).view(2000, 2)

    peaked, flat = draws(0.75).unbind(1)
    assert set(peaked.tolist()) == {1, 3}  # 0.5 + 0.3 reaches 0.75; the tail of 0.2 is never drawn
    assert (peaked == 1).float().mean() == pytest.approx(0.5 / 0.8, abs=0.04)  # renormalised within the set
    assert len(set(flat.tolist())) == 4  # flat: four of 0.2 reach 0.75, the fifth is dropped
    assert set(draws(0.45)[:, 0].tolist()) == {1}  # the top token alone already reaches 0.45
    assert set(draws(1.0)[:, 0].tolist()) == {0, 1, 2, 3, 4}
    assert (draws(1.0, temperature=0.0)[:, 0] == 1).all()  # temperature 0: the argmax, not a draw


def test_temperature_divides_the_logits():
    from mmalign.generate import _pick

    probs = torch.tensor([0.04, 0.5, 0.06, 0.3, 0.1])
    logits = probs.log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    for temperature in (0.5, 2.0):
        sharpened = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
        drawn = _pick(logits, temperature, 1.0, g)
        assert (drawn == 1).float().mean() == pytest.approx(float(sharpened[1]), abs=0.03)


def test_left_pad_puts_every_row_on_the_right_with_a_long_mask():
    from mmalign.generate import left_pad

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_decode_logits_match_the_lm_head_and_follow_its_weight(setup):
    """The decode path keeps a transposed copy of the LM head: it must give the head's logits, also after the
    weight changes in place (a training step, a load) and after a new weight is assigned."""
    model = setup[0]
    hidden = torch.randn(4, model.lm_head.in_features)
    with torch.inference_mode():
        torch.testing.assert_close(model.decode_logits(hidden), model.logits(hidden), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.lm_head.weight.mul_(-2.0)  # in place: same storage, new version
    with torch.inference_mode():
        torch.testing.assert_close(model.decode_logits(hidden), model.logits(hidden), rtol=1e-5, atol=1e-5)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    torch.testing.assert_close(model.decode_logits(hidden), model.logits(hidden), rtol=1e-5, atol=1e-5)


def test_decode_logits_add_a_head_bias(shapes):
    """Llama's head has no bias, but an imported one may: the decode path must add it as nn.Linear does."""
    model, _ = build_model(tiny_model_config(shapes["tokenizer"]))
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.normal_()
    model.llm.set_output_embeddings(head)
    hidden = torch.randn(4, head.in_features)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_logits(hidden), head(hidden), rtol=1e-5, atol=1e-5)


def test_a_head_that_is_not_a_plain_linear_runs_its_own_forward(shapes):
    """The transposed-copy shortcut is for nn.Linear alone: a subclass (or a LoRA-wrapped head) has its own forward."""

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model, _ = build_model(tiny_model_config(shapes["tokenizer"]))
    old = model.lm_head
    head = Doubled(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        head.weight.copy_(old.weight)
    model.llm.set_output_embeddings(head)
    hidden = torch.randn(4, head.in_features)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_logits(hidden), 2 * hidden @ old.weight.T, rtol=1e-5, atol=1e-5)
