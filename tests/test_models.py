"""Shapes, token grids (Table 1), gradients and input checks of every model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmt_fast
from mmt_fast import MAT, create_model
from mmt_fast.config import (
    BottleneckConfig,
    get_config,
    mat_tiny,
    mat_wo_multiscale,
    mvit_tiny,
)
from mmt_fast.layers import Block, BottleneckBlock
from mmt_fast.models.bottleneck import AVBottleneck

ABLATIONS = [n for n in mmt_fast.preset_names() if n.startswith("ablation/")] + ["MMT", "MMT-EK100"]


def tiny_overrides(name: str) -> dict:
    """The ablation's config with tiny encoders, so it runs in a test."""
    cfg = get_config(name)
    over: dict = {"num_classes": {"verb": 3, "noun": 5} if isinstance(cfg.num_classes, dict) else 4}
    if cfg.audio is not None:
        if name == "ablation/avbottle-wo-mat":
            over["audio"] = mat_wo_multiscale(
                input_size=(32, 64), embed_dim=(16, 128), num_heads=(1, 8)
            )
        else:
            over["audio"] = mat_tiny()
    if cfg.video is not None:
        over["video"] = mvit_tiny()
    over["bottleneck"] = BottleneckConfig(num_blocks=2, num_tokens=3, dim=128, num_heads=8)
    return over


def inputs(model, batch: int = 3) -> dict[str, torch.Tensor]:
    out = {}
    if model.audio_encoder is not None:
        out["audio"] = torch.randn(batch, 1, *model.cfg.audio.input_size)
    if model.video_encoder is not None:
        out["video"] = torch.randn(batch, 3, *model.cfg.video.input_size)
    return out


def test_mat_token_grid_follows_table_1():
    """Table 1: 96 x (32x256) -> block 2: 192 x (16x128) -> block 5: 384 x (8x64)
    -> block 21: 768 x (8x32) (time-only pooling), 24 blocks."""
    mat = MAT(num_classes=309)
    grids = mat.token_grids()
    assert grids[0] == (32, 256)  # after the 7x7 stride-4 patch embedding
    assert len(mat.blocks) == 24
    expect = {
        0: (32, 256),
        1: (32, 256),
        2: (16, 128),
        4: (16, 128),
        5: (8, 64),
        20: (8, 64),
        21: (8, 32),
        23: (8, 32),
    }
    for block, grid in expect.items():
        assert grids[block + 1] == grid, f"block {block}"
    dims = [b.attn.dim_out for b in mat.blocks]
    assert (
        dims[:2] == [96, 96]
        and dims[2:5] == [192] * 3
        and dims[5:21] == [384] * 16
        and dims[21:] == [768] * 3
    )
    heads = [b.attn.num_heads for b in mat.blocks]
    assert {b.attn.head_dim for b in mat.blocks} == {96}
    assert heads[0] == 1 and heads[-1] == 8
    # K/V pooling schedule (2x2, 1, 1, 1): stage-1 keys 16x128, later keys at the block's input grid
    assert mat.blocks[0].attn.k_grid_init == (16, 128)
    assert mat.blocks[2].attn.k_grid_init == (32, 256)
    assert mat.blocks[3].attn.k_grid_init == (16, 128)
    # separate rel-pos tables per axis: frequency and time differ in length
    t = mat.blocks[0].attn.rel_pos
    assert [tuple(x.shape) for x in t] == [(63, 96), (511, 96)]


def test_video_token_grid_mvitv2_b():
    v = create_model("MViTv2-B-16")
    grids = v.token_grids()
    assert grids[0] == (8, 56, 56)
    assert grids[3] == (8, 28, 28) and grids[6] == (8, 14, 14) and grids[-1] == (8, 7, 7)
    assert len(v.blocks) == 24
    assert v.blocks[0].attn.k_grid_init == (8, 7, 7)  # K/V stride (1, 8, 8)
    assert len(v.blocks[0].attn.rel_pos) == 3  # time, height, width


@pytest.mark.slow
def test_mat_full_size_forward():
    mat = MAT(num_classes=309).eval()
    x = torch.randn(1, 1, 128, 1024)
    with torch.no_grad():
        feats = mat.forward_features(x)
        logits = mat(x)
    assert feats.tokens.shape == (1, 1 + 8 * 32, 768)
    assert feats.grid == (8, 32)
    assert feats.cls.shape == (1, 768)
    assert logits.shape == (1, 309)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_ast_full_size_forward():
    ast = create_model("AST", num_classes=309).eval()
    with torch.no_grad():
        feats = ast.forward_features(torch.randn(1, 1, 128, 1024))
    assert feats.grid == (12, 101)
    assert feats.tokens.shape == (1, 1212 + 2, 768)


def test_mat_is_a_drop_in_encoder():
    mat = MAT(num_classes=7, cfg=mat_tiny())
    x = torch.randn(2, 1, 32, 64)
    assert mat(x).shape == (2, 7)
    assert mat.embed(x).shape == (2, mat.num_features)
    feats = mat.forward_features(x)
    assert feats.tokens.shape == (2, 1 + feats.grid[0] * feats.grid[1], mat.num_features)
    # no head: forward gives the embedding
    assert MAT(cfg=mat_tiny())(x).shape == (2, 128)
    # a spectrogram of another length still runs (rel-pos tables are resized)
    assert mat(torch.randn(1, 1, 32, 96)).shape == (1, 7)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(2, 32, 64), r"expects input \(B, 1, 32, 64\)"),
        (torch.randn(2, 3, 32, 64), r"expects input \(B, 1, 32, 64\)"),
        (torch.zeros(2, 1, 32, 64, dtype=torch.long), "floating-point"),
    ],
)
def test_mat_rejects_bad_input(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MAT(num_classes=3, cfg=mat_tiny())(bad)


def test_unknown_preset_and_override_errors():
    with pytest.raises(KeyError, match="unknown model 'MAT-XL'"):
        create_model("MAT-XL")
    with pytest.raises(TypeError, match="no field 'depth'"):
        create_model("MAT-tiny", depth=3)
    with pytest.raises(ValueError, match="needs both an audio and a video"):
        create_model("MMT-tiny", video=None)


@pytest.mark.parametrize("name", ABLATIONS)
def test_every_preset_trains_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, **tiny_overrides(name))
    batch = inputs(model, batch=4)
    out = model(**batch)
    heads = model.cfg.heads
    assert set(out.logits) == set(heads)
    for k, n in heads.items():
        assert out.logits[k].shape == (4, n)
    targets = {k: torch.tensor([0, 1, 0, 2]) % n for k, n in heads.items()}
    loss, parts = model.loss(out, targets)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient: {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad
    lc = model.cfg.loss
    expected = {"cls", "total"}
    if lc.align:
        expected.add("avc" if lc.align == "supervised" else "al")
    if lc.intra:
        expected.add("imc" if lc.intra == "supervised" else "imal")
    assert set(parts) == expected


@pytest.mark.parametrize("name", ["MAT-tiny", "AST-tiny", "MViT-tiny"])
def test_single_encoders_train(name):
    model = create_model(name, num_classes=5)
    shape = (1, *model.cfg.input_size) if name != "MViT-tiny" else (3, *model.cfg.input_size)
    x = torch.randn(2, *shape)
    logits = model(x)
    assert logits.shape == (2, 5)
    nn.functional.cross_entropy(logits, torch.tensor([1, 4])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_avg_fusion_averages_probabilities():
    model = create_model("MMT-tiny-avg").eval()
    out = model(**inputs(model, 2))
    pa = out.branch_logits["audio"]["label"].softmax(-1)
    pv = out.branch_logits["video"]["label"].softmax(-1)
    torch.testing.assert_close(out.logits["label"].exp(), (pa + pv) / 2)


def test_bottleneck_block_equals_block_on_concatenation():
    """The split computation of Eq. 5 equals a plain block on [E_V, E_F]."""
    torch.manual_seed(0)
    blk = BottleneckBlock(32, 4)
    ref = Block(32, 4)
    ref.load_state_dict(blk.state_dict())
    x, f = torch.randn(2, 9, 32), torch.randn(2, 3, 32)
    xo, fo = blk(x, f)
    cat = ref(torch.cat([x, f], dim=1))
    torch.testing.assert_close(torch.cat([xo, fo], 1), cat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("update", ["sequential", "average"])
def test_avbottleneck_update_rule(update):
    """Eq. 5-6 written out by hand against the module."""
    torch.manual_seed(0)
    cfg = BottleneckConfig(num_blocks=3, num_tokens=2, dim=16, num_heads=2, update=update)
    mod = AVBottleneck(cfg)
    v, a = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    vo, ao, fo = mod(v, a)
    f = mod.tokens.expand(2, -1, -1)
    history = []
    for bv, ba in zip(mod.video_blocks, mod.audio_blocks):
        both = bv.forward(v, f)
        v, f = both
        a, f = ba(a, f)
        history.append(f)
        if update == "average":
            f = torch.stack(history).mean(0)
    torch.testing.assert_close(vo, v)
    torch.testing.assert_close(ao, a)
    torch.testing.assert_close(fo, f)


def test_mmt_output_heads_for_epic_kitchens():
    model = create_model("MMT-tiny-EK")
    out = model(**inputs(model, 2))
    assert out.logits["verb"].shape == (2, 3) and out.logits["noun"].shape == (2, 5)


def test_mmt_needs_its_modalities():
    model = create_model("MMT-tiny")
    with pytest.raises(ValueError, match="needs the video input"):
        model(audio=torch.randn(1, 1, 32, 64))


def test_bf16_autocast_training_step():
    """Under autocast q is bf16 while parameters (rel-pos tables, norms) stay fp32."""
    model = create_model("MMT-tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs(model, 2))
        loss, _ = model.loss(out, {"label": torch.tensor([0, 1])})
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
def test_video_and_mmt_full_size_forward():
    """MViTv2-B-16 and MMT at the paper's input sizes: 393 video tokens of width
    768 enter the AVBottleneck beside MAT's 257."""
    model = create_model("MMT", num_classes=309).eval()
    audio, video = torch.randn(1, 1, 128, 1024), torch.randn(1, 3, 16, 224, 224)
    with torch.no_grad():
        fv = model.video_encoder.forward_features(video)
        assert fv.grid == (8, 7, 7) and fv.tokens.shape == (1, 1 + 8 * 7 * 7, 768)
        out = model(audio=audio, video=video)
    assert out.logits["label"].shape == (1, 309)
    assert out.audio_embed.shape == out.video_embed.shape == (1, 256)
    assert torch.isfinite(out.logits["label"]).all()
