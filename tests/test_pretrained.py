"""Pretrained checkpoints: converted weights reproduce the public implementations.

The peers' models are built from their own packages (timm, torchvision) with
random weights at small sizes; AST is assembled from timm's DeiT the way AST's
``ASTModel`` does. Their state dicts are saved in the peers' on-disk formats,
converted with :mod:`mmt_fast.pretrained`, and the outputs compared in float64.
Where the converter adapts (channels, rel-pos tables, AST position embeddings,
head, CLS token) each adaptation is checked against its definition.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg, checkpoint_filter_fn
from torch import nn
from torchvision.models.video.mvit import MSBlockConfig, MViT, _interpolate, mvit_v2_s

from mmt_fast import AST, MAT, MultiscaleEncoder
from mmt_fast import create_model as get_model
from mmt_fast.cli import main as cli_main
from mmt_fast.config import ASTConfig, get_config, mat_tiny, mvitv2_b_image, mvitv2_s_16
from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.pretrained import (
    CheckpointError,
    convert_state_dict,
    detect_format,
    init_mmt,
    load_pretrained,
    read_checkpoint,
)
from mmt_fast.run import load_config
from mmt_fast.run.config import config_from_dict
from mmt_fast.train import train

TOL = 1e-10
DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"


class Payload:
    """A pickled object that is not a tensor (refused by weights_only=True)."""


def _perturb(model: nn.Module, std: float = 0.2) -> nn.Module:
    """Random weights away from the init (LayerNorm gains != 1, biases != 0)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


# ----------------------------------------------------------------------------- timm MViTv2


def _timm_mvit(cls_token: bool, depths=(1, 2, 1, 1), dim=8, classes=5) -> MultiScaleVit:
    torch.manual_seed(0)
    cfg = MultiScaleVitCfg(depths=depths, embed_dim=dim, num_heads=1, use_cls_token=cls_token)
    return _perturb(MultiScaleVit(cfg, img_size=(64, 64), num_classes=classes))


def _to_mvit_original(sd: dict, depths) -> dict:
    """timm names -> the original MViT ``.pyth`` names (``blocks.N``, ``proj``,
    ``head.projection``); checked below against timm's own remapping."""
    start = [sum(depths[:s]) for s in range(len(depths))]
    out = {}
    for k, v in sd.items():
        k = re.sub(
            r"^stages\.(\d+)\.blocks\.(\d+)\.",
            lambda m: f"blocks.{start[int(m[1])] + int(m[2])}.",
            k,
        )
        k = k.replace(".shortcut_proj_attn.", ".proj.").replace("head.fc.", "head.projection.")
        out[k] = v
    return out


@pytest.mark.parametrize("cls_token", [False, True], ids=["mvitv2_base", "mvitv2_base_cls"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors", "mvit-pyth"])
def test_timm_mvitv2_into_image_encoder_is_exact(tmp_path, cls_token, fmt):
    depths = (1, 2, 1, 1)
    ref = _timm_mvit(cls_token, depths)
    sd = ref.state_dict()
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        original = _to_mvit_original(sd, depths)
        assert checkpoint_filter_fn({"model_state": original}, ref).keys() == sd.keys()
        torch.save({"model_state": original, "epoch": 300, "cfg": "MVIT: {}"}, path)
    ours = MultiscaleEncoder(
        mvitv2_b_image(
            input_size=(64, 64),
            depths=depths,
            embed_dim=8,
            num_heads=1,
            use_cls_token=cls_token,
            num_classes=5,
        )
    ).eval()
    report = load_pretrained(ours, path)
    assert report.source == "timm-mvitv2" and report.exact and not report.dropped
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert _close(ours.double()(x), ref.double()(x)) < TOL


def _linear_resize(table: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation along rows with half-pixel centres (align_corners=False),
    written out: row i samples x = (i + 0.5) L / n - 0.5, clamped to [0, L - 1]."""
    L = table.shape[0]
    t = table.double()
    rows = []
    for i in range(n):
        x = min(max((i + 0.5) * L / n - 0.5, 0.0), L - 1)
        lo = math.floor(x)
        hi = min(lo + 1, L - 1)
        w = x - lo
        rows.append((1 - w) * t[lo] + w * t[hi])
    return torch.stack(rows)


def _timm_table(key: str) -> str:
    """Our ``blocks.B.attn.rel_pos.A`` -> timm's name (one block per stage)."""
    b, a = re.match(r"blocks\.(\d+)\.attn\.rel_pos\.(\d)", key).groups()
    return f"stages.{b}.blocks.0.attn.rel_pos_{'hw'[int(a)]}"


def test_timm_mvitv2_into_mat_adaptations(tmp_path):
    """mvitv2_base layout (no CLS, 3 channels, 1000-class head) -> MAT: every
    adaptation against its definition, everything else copied."""
    ref = _timm_mvit(False, depths=(1, 1, 1, 1), dim=16, classes=7)
    src = ref.state_dict()
    path = tmp_path / "mvitv2.pth"
    torch.save(src, path)
    mat = MAT(cfg=mat_tiny())
    init_cls = mat.cls_token.detach().clone()
    report = load_pretrained(mat, path)
    got = mat.state_dict()

    adapted = {k for k, *_ in report.adapted}
    tables = [k for k in got if ".rel_pos." in k]
    resized = {k for k in tables if got[k].shape != src[_timm_table(k)].shape}
    assert len(resized) >= 4 and adapted == {"patch_embed.weight", *resized}
    assert [k for k, _ in report.kept] == ["cls_token"]
    assert {k for k, _ in report.dropped} == {"head.weight", "head.bias"}
    torch.testing.assert_close(got["cls_token"], init_cls, rtol=0, atol=0)
    torch.testing.assert_close(
        got["patch_embed.weight"],
        src["patch_embed.proj.weight"].sum(1, keepdim=True),
        rtol=1e-6,
        atol=1e-7,
    )
    for k in tables:
        s = src[_timm_table(k)]
        want = _linear_resize(s, got[k].shape[0]) if k in resized else s.double()
        torch.testing.assert_close(got[k].double(), want, rtol=1e-6, atol=1e-6)
    assert len(report.copied) == len(got) - len(adapted) - 1  # all but those and the CLS
    assert torch.equal(got["blocks.2.attn.qkv.weight"], src["stages.2.blocks.0.attn.qkv.weight"])


def test_timm_full_size_mapping():
    """The real mvitv2_base / mvitv2_base_cls layouts map exactly onto
    MViTv2-B-image, and onto MAT-B with the 51 adaptations (on the meta device:
    shapes only)."""
    with torch.device("meta"):
        for name, cls in (("mvitv2_base_cls", True), ("mvitv2_base", False)):
            cfg = MultiScaleVitCfg(depths=(2, 3, 16, 3), use_cls_token=cls)
            sd = MultiScaleVit(cfg, num_classes=1000).state_dict()
            image = MultiscaleEncoder(mvitv2_b_image(use_cls_token=cls))
            _, report = convert_state_dict(sd, image)
            assert report.exact and len(report.copied) == len(sd), name
        _, report = convert_state_dict(sd, MAT())  # mvitv2_base: no CLS
    assert len(report.adapted) == 1 + 48  # patch embedding + 24 blocks x 2 tables
    assert {k for k, _ in report.dropped} == {"head.weight", "head.bias"}
    assert [k for k, _ in report.kept] == ["cls_token"]
    rows = {k: (a[0], b[0]) for k, _, a, b in report.adapted}
    assert rows["blocks.0.attn.rel_pos.0"] == (111, 63)  # frequency: 56 -> 32 tokens
    assert rows["blocks.0.attn.rel_pos.1"] == (111, 511)  # time: 56 -> 256 tokens


# ----------------------------------------------------------------------------- torchvision / SlowFast


def _tv_blocks():
    # (heads, in, out, stride_q, stride_kv): mvit_v2_s's pattern at depths (1, 2, 1, 1)
    spec = [
        (1, 8, 8, (1, 1, 1), (1, 8, 8)),
        (2, 8, 16, (1, 2, 2), (1, 4, 4)),
        (2, 16, 16, (1, 1, 1), (1, 4, 4)),
        (4, 16, 32, (1, 2, 2), (1, 2, 2)),
        (8, 32, 64, (1, 2, 2), (1, 1, 1)),
    ]
    return [MSBlockConfig(h, i, o, [3] * 3, [3] * 3, list(q), list(kv)) for h, i, o, q, kv in spec]


def _tv_mvit(frames: int = 4, with_cls: bool = False) -> MViT:
    torch.manual_seed(0)
    return _perturb(
        MViT(
            (64, 64),
            frames,
            _tv_blocks(),
            residual_pool=True,
            residual_with_cls_embed=with_cls,
            rel_pos_embed=True,
            proj_after_attn=True,
            dropout=0.0,
            num_classes=5,
        )
    )


def _our_video(frames: int = 4, **kw) -> MultiscaleEncoder:
    cfg = mvitv2_s_16(
        input_size=(frames, 64, 64), depths=(1, 2, 1, 1), embed_dim=8, num_heads=1, num_classes=5
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return MultiscaleEncoder(cfg).eval()


def _to_slowfast(sd: dict) -> dict:
    """torchvision names -> SlowFast's MViT names (slowfast/models/video_model_builder.py,
    attention.py): patch_embed.proj, cls_token (1, 1, C), attn.proj, attn.pool_q
    (conv) / attn.norm_q, blocks.N.proj, mlp.fc1/fc2, head.projection."""
    rules = [
        (r"^conv_proj\.", "patch_embed.proj."),
        (r"\.attn\.project\.0\.", ".attn.proj."),
        (r"\.attn\.pool_([qkv])\.pool\.", r".attn.pool_\1."),
        (r"\.attn\.pool_([qkv])\.norm_act\.0\.", r".attn.norm_\1."),
        (r"\.mlp\.0\.", ".mlp.fc1."),
        (r"\.mlp\.3\.", ".mlp.fc2."),
        (r"^(blocks\.\d+)\.project\.", r"\1.proj."),
        (r"^head\.1\.", "head.projection."),
    ]
    out = {}
    for k, v in sd.items():
        if k == "pos_encoding.class_token":
            out["cls_token"] = v.reshape(1, 1, -1)
            continue
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


@pytest.mark.parametrize("fmt", ["torchvision", "slowfast"])
def test_video_checkpoints_are_exact(tmp_path, fmt):
    """torchvision's MViTv2 (SlowFast semantics: no "+ q" on the CLS row) and the
    same weights as a SlowFast .pyth reproduce the logits; with the CLS switch
    the other way round they do not."""
    ref = _tv_mvit()
    sd = ref.state_dict()
    if fmt == "torchvision":
        path = tmp_path / "mvit_v2_s.pth"
        torch.save(sd, path)
    else:
        path = tmp_path / "MViTv2_S_16x4_k400.pyth"
        torch.save({"model_state": _to_slowfast(sd), "epoch": 200, "cfg": "MVIT: {}"}, path)
    ours = _our_video()
    assert ours.cfg.residual_cls is False  # the video presets' default
    report = load_pretrained(ours, path)
    assert report.source == fmt and report.exact and not report.dropped
    x = torch.randn(2, 3, 4, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = ref.double()(x)
        assert _close(ours.double()(x), want) < TOL
        timm_style = _our_video(residual_cls=True)
        load_pretrained(timm_style, path)
        assert _close(timm_style.double()(x), want) > 1e-3


def test_video_temporal_tables_interpolated(tmp_path):
    """A checkpoint trained on more frames (MViTv2-B 32x3 -> the 16-frame model):
    the temporal tables are resized with MViTv2's own interpolation
    (torchvision's ``_interpolate``), everything else copied."""
    long_clip = _tv_mvit(frames=8).state_dict()  # T grid 4: temporal tables of 7 rows
    path = tmp_path / "MViTv2_32x3.pyth"
    torch.save({"model_state": _to_slowfast(long_clip)}, path)
    ours = _our_video(frames=4)  # T grid 2: 3 rows
    report = load_pretrained(ours, path)
    assert {k for k, *_ in report.adapted} == {f"blocks.{i}.attn.rel_pos.0" for i in range(5)}
    assert not report.kept and not report.dropped

    ref = _tv_mvit(frames=4)
    state = dict(long_clip)
    for i in range(5):
        key = f"blocks.{i}.attn.rel_pos_t"
        state[key] = _interpolate(long_clip[key], ref.state_dict()[key].shape[0])
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 4, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert _close(ours.double()(x), ref.double()(x)) < 1e-6  # tables resized in float32


def _mvitv2_b_blocks() -> list[MSBlockConfig]:
    """SlowFast's MViTv2-B (Kinetics/MVITv2_B_32x3.yaml) as torchvision block settings."""
    out, dim, heads = [], 96, 1
    for stage, depth in enumerate((2, 3, 16, 3)):
        for i in range(depth):
            new_dim, new_heads = (dim * 2, heads * 2) if stage and not i else (dim, heads)
            q = [1, 2, 2] if stage and not i else [1, 1, 1]
            kv = [1, 8 // 2**stage, 8 // 2**stage] if stage < 3 else [1, 1, 1]
            out.append(MSBlockConfig(new_heads, dim, new_dim, [3] * 3, [3] * 3, q, kv))
            dim, heads = new_dim, new_heads
    return out


def test_video_full_size_mapping():
    """torchvision's mvit_v2_s maps exactly onto MViTv2-S-16; SlowFast's MViTv2-B
    32x3 (K400) onto the 16-frame MViTv2-B-16 with its 24 temporal tables resized
    (on the meta device: shapes only)."""
    with torch.device("meta"):
        sd = mvit_v2_s().state_dict()
        _, report = convert_state_dict(sd, MultiscaleEncoder(mvitv2_s_16(num_classes=400)))
        assert report.source == "torchvision" and report.exact and len(report.copied) == len(sd)
        b32 = MViT((224, 224), 32, _mvitv2_b_blocks(), True, False, True, True, num_classes=400)
        sd = _to_slowfast(b32.state_dict())
        _, report = convert_state_dict(sd, MultiscaleEncoder(get_config("MViTv2-B-16")))
    assert report.source == "slowfast" and not report.kept
    assert {k for k, _ in report.dropped} == {"head.weight", "head.bias"}
    assert [(a[0], b[0]) for _, _, a, b in report.adapted] == [(31, 15)] * 24


# ----------------------------------------------------------------------------- AST


class ASTReference(nn.Module):
    """AST's ``ASTModel`` (YuanGongND/ast, src/models/ast_models.py) at a small
    size: timm's DeiT with a 1-channel overlapping patch projection, position
    embeddings for the spectrogram's patch grid, and ``mlp_head``. With a DeiT
    model given, its weights are adapted by AST's ImageNet rules."""

    def __init__(self, label_dim, fdim, tdim, deit: VisionTransformerDistilled, pretrain: bool):
        super().__init__()
        self.v = deit
        d = deit.pos_embed.shape[2]
        hw = int(deit.patch_embed.num_patches**0.5)
        self.mlp_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, label_dim))
        f_dim, t_dim = (fdim - 16) // 10 + 1, (tdim - 16) // 10 + 1
        new_proj = nn.Conv2d(1, d, kernel_size=(16, 16), stride=(10, 10))
        if pretrain:
            new_proj.weight = nn.Parameter(
                torch.sum(deit.patch_embed.proj.weight, dim=1).unsqueeze(1)
            )
            new_proj.bias = deit.patch_embed.proj.bias
            pos = deit.pos_embed[:, 2:, :].detach().reshape(1, hw * hw, d).transpose(1, 2)
            pos = pos.reshape(1, d, hw, hw)
            if t_dim <= hw:
                pos = pos[
                    :, :, :, int(hw / 2) - int(t_dim / 2) : int(hw / 2) - int(t_dim / 2) + t_dim
                ]
            else:
                pos = F.interpolate(pos, size=(hw, t_dim), mode="bilinear")
            if f_dim <= hw:
                pos = pos[
                    :, :, int(hw / 2) - int(f_dim / 2) : int(hw / 2) - int(f_dim / 2) + f_dim, :
                ]
            else:
                pos = F.interpolate(pos, size=(f_dim, t_dim), mode="bilinear")
            pos = pos.reshape(1, d, f_dim * t_dim).transpose(1, 2)
            deit.pos_embed = nn.Parameter(torch.cat([deit.pos_embed[:, :2, :].detach(), pos], 1))
        else:
            deit.pos_embed = nn.Parameter(torch.randn(1, f_dim * t_dim + 2, d) * 0.2)
        deit.patch_embed.proj = new_proj

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, F) as AST takes it -> the averaged CLS/distillation token."""
        x = x.unsqueeze(1).transpose(2, 3)
        B = x.shape[0]
        x = self.v.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat(
            (self.v.cls_token.expand(B, -1, -1), self.v.dist_token.expand(B, -1, -1), x), 1
        )
        x = self.v.pos_drop(x + self.v.pos_embed)
        for blk in self.v.blocks:
            x = blk(x)
        x = self.v.norm(x)
        return (x[:, 0] + x[:, 1]) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.features(x))


def _deit(img: int = 64) -> VisionTransformerDistilled:
    torch.manual_seed(0)
    return _perturb(
        VisionTransformerDistilled(
            img_size=img, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=11
        )
    )


def test_ast_checkpoint_is_exact(tmp_path):
    """An AST checkpoint as AST saves it (nn.DataParallel: module.v.*, module.mlp_head.*)."""
    ref = _perturb(ASTReference(7, 32, 64, _deit(), pretrain=False))
    path = tmp_path / "audioset_10_10.pth"
    torch.save(nn.DataParallel(ref).state_dict(), path)
    ours = AST(
        cfg=ASTConfig(input_size=(32, 64), embed_dim=32, depth=2, num_heads=2), num_classes=7
    )
    report = load_pretrained(ours.eval(), path)
    assert report.source == "ast" and report.exact
    assert {k for k, _ in report.dropped} == {
        "head.weight",
        "head.bias",
        "head_dist.weight",
        "head_dist.bias",
    }
    spec = torch.randn(2, 64, 32, dtype=torch.float64)  # (B, T, F), AST's layout
    with torch.no_grad():
        assert _close(ours.double()(spec.transpose(1, 2)[:, None]), ref.double()(spec)) < TOL
    # what `mmt-fast convert` writes (our names) loads back exactly, head included
    mine = tmp_path / "ast.safetensors"
    save_file(ours.state_dict(), str(mine))
    again = AST(cfg=ours.cfg, num_classes=7).double()
    assert load_pretrained(again, mine).exact
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize(
    "fdim,tdim", [(32, 64), (64, 32)], ids=["cut-f,interp-t", "interp-f,cut-t"]
)
def test_deit_into_ast_follows_ast(tmp_path, fdim, tdim):
    """DeiT (ImageNet, 3 channels, 4 x 4 patches, two classifiers) -> AST with
    AST's patch-kernel sum and position-embedding cut/interpolation."""
    deit = _deit()
    path = tmp_path / "deit.safetensors"
    save_file({k: v.contiguous() for k, v in deit.state_dict().items()}, str(path))
    ours = AST(cfg=ASTConfig(input_size=(fdim, tdim), embed_dim=32, depth=2, num_heads=2))
    report = load_pretrained(ours.eval(), path)
    assert {k for k, *_ in report.adapted} == {"patch_embed.weight", "pos_embed"}
    ref = ASTReference(7, fdim, tdim, deit, pretrain=True).eval()
    spec = torch.randn(2, tdim, fdim, dtype=torch.float64)
    with torch.no_grad():
        got = ours.double().embed(spec.transpose(1, 2)[:, None])
        assert _close(got, ref.double().features(spec)) < 1e-6  # adapted in float32


def test_ast_full_size_pos_embed():
    """deit_base_distilled_patch16_384 (24 x 24 patches) -> AST-B's 12 x 101 grid."""
    with torch.device("meta"):
        deit = VisionTransformerDistilled(
            img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12
        )
        _, report = convert_state_dict(deit.state_dict(), AST(num_classes=527))
    pos = next(a for a in report.adapted if a[0] == "pos_embed")
    assert pos[1:] == (
        "AST position embeddings (24, 24) -> (12, 101)",
        (1, 578, 768),
        (1, 1214, 768),
    )
    assert {k for k, _ in report.kept} == {
        "head.0.weight",
        "head.0.bias",
        "head.1.weight",
        "head.1.bias",
    }


# ----------------------------------------------------------------------------- CLI, errors


def test_convert_cli_round_trip(tmp_path, capsys):
    ref = _timm_mvit(False, depths=(1, 1, 1, 1), dim=16)
    src = tmp_path / "in1k.pth"
    torch.save(ref.state_dict(), src)
    out = tmp_path / "mat.safetensors"
    argv = ["convert", "--from", "timm-mvitv2", "--checkpoint", str(src), "--out", str(out)]
    assert cli_main([*argv, "--model", "MAT-tiny"]) == 0
    log = capsys.readouterr().out
    assert "adapted patch_embed.weight: RGB kernels summed" in log and "[3/3] writing" in log
    assert detect_format(read_checkpoint(out)) == "mmt-fast"
    assert cli_main([*argv, "--model", "MViT-tiny"]) == 2  # an image checkpoint into video
    assert "needs a 2-D model" in capsys.readouterr().err
    direct = MAT(cfg=mat_tiny())
    load_pretrained(direct, src)
    again = MAT(cfg=mat_tiny())
    report = load_pretrained(again, out)
    assert report.source == "mmt-fast" and report.exact
    for k, v in direct.state_dict().items():
        if k != "cls_token":  # the CLS token is each model's own initialisation
            assert torch.equal(again.state_dict()[k], v), k


def test_strict_errors_name_the_problem(tmp_path):
    deeper = _timm_mvit(False, depths=(1, 2, 1, 1), dim=16).state_dict()
    with pytest.raises(CheckpointError, match="the checkpoint has 5 blocks, the model 4") as e:
        convert_state_dict(deeper, MAT(cfg=mat_tiny()))
    assert "the architectures differ" in str(e.value)
    with pytest.raises(CheckpointError, match=r"needs a 3-D \(video\) model"):
        convert_state_dict(_tv_mvit().state_dict(), MAT(cfg=mat_tiny()))
    with pytest.raises(CheckpointError, match="cannot tell the format"):
        detect_format({"foo.weight": torch.zeros(1)})

    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_checkpoint(evil)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"model\.init\.audio and model\.init\.ast both set"):
        config_from_dict({"model": {"init": {"audio": "a.pth", "ast": "b.pth"}}})
    with pytest.raises(ValueError, match=r"model\.init\.video_from='kinetics'"):
        config_from_dict({"model": {"init": {"video": "a.pth", "video_from": "kinetics"}}})
    with pytest.raises(ValueError, match="the model has no video encoder"):
        init_mmt(get_model("MMT-tiny-audio"), video=str(evil))
    get_config("MViTv2-B-image")  # the image preset exists for users of the converter


# ----------------------------------------------------------------------------- training


def test_mat_from_imagenet_checkpoint_trains_a_step(tmp_path):
    """``model.init.audio`` with an ImageNet-format (timm) checkpoint: the run
    starts from the converted weights and trains a step on synthetic clips."""
    ckpt = tmp_path / "mvitv2_base_in1k.pth"
    torch.save(_timm_mvit(False, depths=(1, 1, 1, 1), dim=16, classes=1000).state_dict(), ckpt)
    expected = MAT(cfg=mat_tiny())
    load_pretrained(expected, ckpt)
    manifest = make_synthetic(tmp_path / "syn", num_clips=12, seed=0, size=32, duration=2.0)
    cfg = load_config(
        DEMO,
        [
            f"data.train={manifest}",
            "data.val=null",
            "data.test=null",
            "model.preset=MMT-tiny-audio",
            f"model.init.audio={ckpt}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.max_steps=1",
            "train.batch_size=4",
            "train.eval_every=0",
            "train.ckpt_every=null",
            "train.progress=false",
            "train.tensorboard=false",
            "schedule.warmup_steps=0",
        ],
    )
    assert cfg.model.init.audio == str(ckpt)
    assert train(cfg)["step"] == 1
    (saved,) = (tmp_path / "run").rglob("model.safetensors")
    trained = read_checkpoint(saved)
    moved = []
    for k, v in expected.state_dict().items():
        if k == "cls_token":
            continue  # MAT's own initialisation (the checkpoint has none)
        after = trained[f"audio_encoder.{k}"]
        assert torch.isfinite(after).all(), k
        assert (after - v).abs().max() < 0.01, k  # one small step from the checkpoint
        moved.append((after - v).abs().max().item())
    assert max(moved) > 0  # and the step did change the weights

    # a trained run's weights initialise the encoder of another run
    again = get_model("MMT-tiny-audio")
    (report,) = init_mmt(again, audio=str(saved)).values()
    assert report.source == "mmt-fast" and report.exact
    for k, v in again.audio_encoder.state_dict().items():
        assert torch.equal(v, trained[f"audio_encoder.{k}"]), k
