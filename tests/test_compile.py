"""torch.compile of the models and in the trainer: one graph (``fullgraph=True``) for
forward + backward with the fused ops as opaque custom ops, gradients equal to eager
(selective recomputation included), and ``train.compile`` runs whose checkpoints keep
the plain model's names and resume with compile off.

``backend="aot_eager"`` traces the same graphs and autograd as inductor without
generating code (inductor takes minutes per model on two cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from config_helpers import as_overrides
from kernel_helpers import cpu_kernels

from mmt_fast import create_model
from mmt_fast.models.checkpointing import set_activation_checkpointing

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"


def _inputs(model, name):
    g = torch.Generator().manual_seed(3)
    if "MMT" in name:
        cfg = model.cfg
        return {
            "audio": torch.randn(2, 1, *cfg.audio.input_size, generator=g, dtype=torch.float64),
            "video": torch.randn(2, 3, *cfg.video.input_size, generator=g, dtype=torch.float64),
        }
    return {"x": torch.randn(2, 1, 32, 64, generator=g, dtype=torch.float64)}


def _loss_and_grads(model, fn, name, inputs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # drop path draws the same masks in both runs
    out = fn(**inputs)
    loss = model.loss(out, {"label": torch.tensor([0, 1])})[0] if "MMT" in name else out.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "name, mode",
    [
        pytest.param("MAT-tiny", "selective", marks=pytest.mark.slow),
        pytest.param("MMT-tiny", "selective", marks=pytest.mark.slow),
    ],
)
def test_fullgraph_forward_backward_equals_eager(name, mode):
    """float64: the compiled step's loss and every gradient equal the eager ones, up to
    round-off relative to the largest gradient (some gradients are zero in exact
    arithmetic, e.g. a LayerNorm bias on K)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    kw = {"audio__drop_path_rate": 0.2} if "MMT" in name else {"drop_path_rate": 0.2}
    model = create_model(name, **kw).double()
    set_activation_checkpointing(model, mode)
    inputs = _inputs(model, name)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ref_loss, ref = _loss_and_grads(model, model, name, inputs)
    loss, got = _loss_and_grads(model, compiled, name, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    scale = max(g.abs().max().item() for g in ref.values())
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-10 * scale, msg=n)


@cpu_kernels
def test_fused_ops_are_single_nodes_of_the_graph():
    """With the Triton path (interpreted), the fused ops reach the compiled graph as
    their custom ops, one node each, in one graph (fullgraph: no break)."""
    from mmt_fast import MAT
    from mmt_fast.config import mat_tiny
    from mmt_fast.kernels import dispatch

    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    micro = dict(input_size=(16, 32), depths=(1, 1), embed_dim=(8, 16), num_heads=(1, 2),
                 stride_q=((1, 1), (2, 2)), stride_kv=((2, 2), (1, 1)))  # fmt: skip
    model = MAT(num_classes=3, cfg=mat_tiny(**micro)).eval()
    x = torch.randn(2, 1, 16, 32)
    with dispatch.use("triton"), torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(got, want)
    assert sum("mmt_fast.relpos_attention_fwd" in s for s in seen) == 2, seen
    assert sum("mmt_fast.pooled_qkv_fwd" in s for s in seen) == 2, seen


def _overrides(manifest, out_dir, **extra):
    o = {
        "model.preset": "MMT-tiny-audio",
        "model.overrides": {"audio__drop_path_rate": 0.1},
        "data.train": str(manifest),
        "data.val": str(manifest),
        "data.test": str(manifest),
        "data.num_workers": 0,
        "train.out_dir": str(out_dir),
        "train.batch_size": 4,
        "train.epochs": 1,
        "train.ckpt_every": 2,
        "train.eval_every": 0,
        "train.deterministic": True,
        "train.torch_threads": 1,
        "train.progress": False,
        "train.tensorboard": False,
        "train.activation_checkpointing": "selective",
    }
    o.update(extra)
    return as_overrides(o)


@pytest.mark.slow
def test_train_compile_checkpoints_plain_names_and_resumes_without_it(tmp_path, capsys):
    """``mmt-fast train ... train.compile=true`` (aot_eager) for 2 steps, checkpointed, then
    resumed with compile off for a third: the checkpoint has the plain model's names, the
    terminal says when it compiled, and the weights equal an eager run's."""
    from safetensors.torch import load_file

    from mmt_fast.cli import main
    from mmt_fast.data.synthetic import make_synthetic

    manifest = make_synthetic(tmp_path / "syn", num_clips=24, size=32, duration=1.0, fps=16)
    torch._dynamo.reset()
    run = tmp_path / "compiled"
    cfg = ["--config", str(DEMO)]
    on = ["train.compile=true", "train.compile_backend=aot_eager", "train.max_steps=2"]
    assert main(["train", *cfg, *_overrides(manifest, run), *on]) == 0
    err = capsys.readouterr().err
    assert "torch.compile: compiling" in err and "torch.compile: compiled" in err
    (ckpt,) = sorted((run / "checkpoints").glob("step_*/model.safetensors"))
    names = list(load_file(str(ckpt)))
    assert names and not any("_orig_mod" in n or n.startswith("module.") for n in names)
    off = ["train.compile=false", "train.max_steps=3"]
    assert main(["train", *cfg, "--resume", *_overrides(manifest, run), *off]) == 0
    assert "torch.compile" not in capsys.readouterr().err

    eager = tmp_path / "eager"
    assert main(["train", *cfg, *_overrides(manifest, eager), "train.max_steps=3"]) == 0
    last = {
        d: sorted((d / "checkpoints").glob("step_*/model.safetensors"))[-1] for d in (run, eager)
    }
    assert last[run].parent.name == last[eager].parent.name
    assert int(last[run].parent.name.removeprefix("step_")) == 3
    a, b = load_file(str(last[run])), load_file(str(last[eager]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
