"""The onellm family's depth and video tokenizers over an image tower start from the tower's own patch embedding
(OneLLM feeds depth maps and frames to CLIP's conv1): a depth map is the tower's grey image, near bright; a still
clip is each frame's image tokens; and `tower_family` tells a CLIP tower from a SigLIP one by its config."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from helpers import TINY_VISION
from mmalign.modalities import get_modality
from mmalign.modalities.depth import DepthTokenizer, TowerDepthTokenizer
from mmalign.modalities.video import TowerVideoTokenizer, VideoTokenizer
from mmalign.models.encoders import clip_encoder, load_tower, siglip_encoder, tower_family


@pytest.fixture(params=["clip", "siglip"])
def tower(request):
    torch.manual_seed(0)
    build = clip_encoder if request.param == "clip" else siglip_encoder
    return build(config=dict(TINY_VISION), keep_cls=request.param == "clip")


def grey_image(level: torch.Tensor, tower) -> torch.Tensor:
    """(items, 1, H, W) grey levels in [0, 1] -> the tower's normalised RGB input."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (tower.mean, tower.std))
    return (level.expand(-1, 3, -1, -1) - mean) / std


def test_depth_is_the_towers_grey_image_near_bright(tower):
    tok = get_modality("depth").tokenizer(tower, {"max_depth": 8.0})
    assert isinstance(tok, TowerDepthTokenizer) and (tok.size, tok.max_depth) == (32, 8.0)
    assert tok.num_tokens == 16 + int(tower.has_cls) and tok.hidden_size == 32
    depth = torch.rand(2, 1, 32, 32) * 0.9 + 0.05  # preprocessed: metres / max_depth
    want = tower._body().embeddings(grey_image(1.0 - depth, tower))
    torch.testing.assert_close(tok(depth), want)
    assert tok(depth).shape == (2, tok.num_tokens, 32)
    # A missing reading (0) is dark, like the far wall, not the nearest thing in view.
    missing = depth.clone()
    missing[:, :, :8, :8] = 0.0
    torch.testing.assert_close(
        tok(missing), tower._body().embeddings(grey_image(torch.where(missing > 0, 1 - missing, 0.0), tower))
    )
    # A copy: training the tokenizer leaves the tower's embedding alone.
    tok(depth).square().mean().backward()
    assert all(p.grad is not None for p in tok.parameters())
    assert all(p.grad is None for p in tower.parameters())


def test_depth_detail_branch_adds_to_its_own_patch_token(tower):
    """The detail branch's cells line up with the tower's patches (row-major, after any class token), and with the
    branch off the tokens are the tower's embedding whatever the branch learned."""
    torch.manual_seed(0)
    tok = TowerDepthTokenizer(tower, detail_channels=16)  # 32 px, patch 8: a 4 x 4 grid
    torch.nn.init.normal_(tok.detail[-1].weight)  # as if trained
    plain = TowerDepthTokenizer(tower)  # the default: no branch, so checkpoints from before it still load
    plain.load_state_dict({k: v for k, v in tok.state_dict().items() if not k.startswith("detail.")})
    assert plain.detail is None
    depth = torch.full((1, 1, 32, 32), 0.9)
    bumped = depth.clone()
    bumped[:, :, 10:14, 18:22] = 0.2  # inside patch (row 1, column 2), 2 px from its edges: two 3x3 convs stay in
    added = (tok(bumped) - plain(bumped)) - (tok(depth) - plain(depth))  # what the branch adds for the bump
    changed = added.abs().amax(-1)[0] > 1e-6  # (tokens,)
    cls = int(tower.has_cls)
    assert changed.nonzero().flatten().tolist() == [cls + 1 * 4 + 2]
    with pytest.raises(ValueError, match="detail_channels"):
        TowerDepthTokenizer(tower, detail_channels=-1)


def test_depth_tokenizer_checks_its_input_and_settings(tower):
    with pytest.raises(ValueError, match="max_depth"):
        TowerDepthTokenizer(tower, max_depth=0)
    with pytest.raises(TypeError, match="patch"):
        get_modality("depth").tokenizer(tower, {"patch": 8})  # the tower's patch is the patch
    with pytest.raises(ValueError, match=r"expects \(items, 1, 32, 32\)"):
        TowerDepthTokenizer(tower)(torch.zeros(2, 1, 16, 16))
    # Without a tower (inside the projector family's modality transformer): a fresh convolution, which takes the
    # detail branch too (a recipe's settings serve both families); it starts as the tokenizer without it.
    assert isinstance(get_modality("depth").tokenizer(type("W", (), {"hidden_size": 8})(), {}), DepthTokenizer)
    torch.manual_seed(0)
    fresh = DepthTokenizer(8, detail_channels=4)
    plain = DepthTokenizer(8)
    plain.load_state_dict({k: v for k, v in fresh.state_dict().items() if not k.startswith("detail.")})
    depth = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(fresh(depth), plain(depth))
    torch.nn.init.normal_(fresh.detail[-1].weight)
    assert not torch.allclose(fresh(depth)[:, 1:], plain(depth)[:, 1:])
    torch.testing.assert_close(fresh(depth)[:, :1], plain(depth)[:, :1])  # the class token is left alone


def test_a_still_clip_is_each_frames_image_tokens(tower):
    tok = get_modality("video").tokenizer(tower, {"num_frames": 4, "size": 32, "tubelet": 2})
    assert isinstance(tok, TowerVideoTokenizer)
    cls = int(tower.has_cls)
    assert tok.num_tokens == cls + 2 * 16 and (tok.mean, tok.std) == (tower.mean, tower.std)
    frame = torch.randn(3, 3, 32, 32)
    still = frame[:, None].expand(-1, 4, -1, -1, -1)
    out = tok(still)
    image = tower._body().embeddings(frame)
    assert out.shape == (3, tok.num_tokens, 32)
    torch.testing.assert_close(out[:, : cls + 16], image, atol=1e-5, rtol=1e-5)  # time steps start equal
    torch.testing.assert_close(out[:, cls + 16 :], image[:, cls:], atol=1e-5, rtol=1e-5)
    # The time embedding trains, and with it the order of frames becomes visible.
    out.square().mean().backward()
    assert tok.time.grad is not None and tok.time.grad.abs().sum() > 0
    with torch.no_grad():
        tok.time[1] += 1.0
    moving = torch.randn(1, 4, 3, 32, 32)
    assert not torch.allclose(tok(moving), tok(moving.flip(1)))


def test_video_positions_are_resampled_to_another_frame_size(tower):
    tok = TowerVideoTokenizer(tower, num_frames=2, size=16, tubelet=1)  # a 2 x 2 grid from the tower's 4 x 4
    assert tok.num_tokens == int(tower.has_cls) + 2 * 4
    assert tok(torch.randn(2, 2, 3, 16, 16)).shape == (2, tok.num_tokens, 32)
    table = tower._body().embeddings.position_embedding.weight[int(tower.has_cls) :]
    assert torch.allclose(tok.pos.mean(0), table.mean(0), atol=0.05)  # resampled, not drawn afresh
    with pytest.raises(ValueError, match="patch size 8"):
        TowerVideoTokenizer(tower, size=20)
    with pytest.raises(ValueError, match="tubelet"):
        TowerVideoTokenizer(tower, num_frames=7)
    assert isinstance(get_modality("video").tokenizer(type("W", (), {"hidden_size": 8})(), {}), VideoTokenizer)


def test_tower_family_reads_the_model_type(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "clip")
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "siglip")
    assert tower_family(tmp_path / "clip") == "clip" and tower_family(tmp_path / "siglip") == "siglip"
    assert load_tower(tmp_path / "siglip").family == "siglip"
    assert load_tower(tmp_path / "clip", keep_cls=True).num_tokens == 17
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' is not a CLIP or SigLIP"):
        tower_family(tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        tower_family(tmp_path / "nothing")
