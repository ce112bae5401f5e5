"""The benchmark plot: per case, time per path (log scale) and peak extra memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {
    "fused": "#1b9e77",
    "reference": "#7570b3",
    "sdpa": "#d95f02",
    "flex": "#e7298a",
    "xformers": "#66a61e",
    "compiled": "#e6ab02",
}


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Per case: fwd (light) and fwd+bwd (dark) ms per path, log scale; below, peak extra GB
    of fwd+bwd with the size of one N x M bf16 tensor as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"plot skipped: matplotlib unavailable ({e})")
        return None
    cases = {n: c for n, c in results["cases"].items() if not c.get("skipped")}
    if not cases:
        return None
    cols = 4
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(
        2 * rows, cols, figsize=(4.2 * cols, 5.2 * rows), squeeze=False, layout="constrained"
    )
    env = results.get("env", {})
    fig.suptitle(
        f"mmt-fast kernels, {results.get('dtype')} on {env.get('device')} "
        f"(torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date', '')[:10]})\n"
        "top: time, log scale (light = forward, dark = forward+backward); bottom: extra "
        "memory of forward+backward (dashed: one N x M bf16 tensor)",
        fontsize=10,
    )
    for idx, (name, c) in enumerate(cases.items()):
        r, col = divmod(idx, cols)
        ax_t, ax_m = axes[2 * r][col], axes[2 * r + 1][col]
        names = list(c["paths"])
        x = range(len(names))
        for i, p in enumerate(names):
            pr = c["paths"][p]
            color = COLORS.get(p, "gray")
            if pr.get("status") == "ok":
                ax_t.bar(i - 0.2, pr["fwd_ms"], 0.4, color=color, alpha=0.45)
                if "fwd_bwd_ms" in pr:
                    ax_t.bar(i + 0.2, pr["fwd_bwd_ms"], 0.4, color=color)
                    ax_t.text(i + 0.2, pr["fwd_bwd_ms"], f"{pr['fwd_bwd_ms']:.3g}",
                              ha="center", va="bottom", fontsize=7)  # fmt: skip
                if "fwd_bwd_extra_gb" in pr:
                    ax_m.bar(i, pr["fwd_bwd_extra_gb"], 0.6, color=color)
            else:
                label = str(pr.get("status", "?"))
                label = "n/a" if label == "skipped" else label
                ax_t.text(i, 0.5, label, ha="center", va="center", rotation=90, fontsize=8,
                          transform=ax_t.get_xaxis_transform(), color="gray")  # fmt: skip
        ax_t.set_yscale("log")
        ax_t.set_title(f"{name}\n{c['source']}", fontsize=9)
        ax_t.set_ylabel("ms")
        if c["op"] != "pooled" and any("fwd_bwd_extra_gb" in p for p in c["paths"].values()):
            ax_m.axhline(c["nm_bf16_gb"], color="k", ls="--", lw=0.8)
        ax_m.set_ylabel("GB")
        for ax in (ax_t, ax_m):
            ax.set_xticks(list(x), names, rotation=30, fontsize=8)
            ax.set_xlim(-0.6, len(names) - 0.4)
    for idx in range(len(cases), rows * cols):
        r, col = divmod(idx, cols)
        axes[2 * r][col].axis("off")
        axes[2 * r + 1][col].axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
