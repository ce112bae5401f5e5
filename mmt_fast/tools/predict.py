"""``mmt-fast predict``: classify unlabelled clips with a trained run.

Inputs are media files, folders (searched recursively for video files, and for
``.wav`` files when the model is audio-only) and list files: ``.txt``/``.lst``
with one path a line (``#`` comments; relative paths are relative to the list
file's folder), or a ``.csv``/``.jsonl`` manifest whose ``path`` column (and
``start_s``/``end_s``, if present) is read and whose labels are ignored.

Each clip is decoded as in evaluation (the run's data settings, ``V`` test
views: uniform temporal windows and a centre crop); its class probabilities are
the mean over the views of the softmax of the multimodal logits,
``p = 1/V sum_v softmax(z_v)`` (the same function as ``mmt-fast evaluate``), so
on a labelled split the top-1 predictions give exactly the accuracy evaluate
reports. The optional embeddings are the input of the classification head (for
MMT: ``[LN(video CLS), LN(audio CLS)]`` after the AVBottleneck, 2 x width;
for one encoder its CLS token; for ``avg`` fusion [video CLS, audio CLS]),
averaged over the views: (N, D) float32, one row per output row.

Bad files (missing, corrupt, no audio, ...) are skipped, listed on stderr and
counted per kind; they do not appear in the output.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmt_fast.data import ClipRecord, read_manifest
from mmt_fast.data.manifests import VIDEO_EXTENSIONS
from mmt_fast.errors import ConfigError
from mmt_fast.inference import (
    LoadedRun,
    batch_transform,
    clip_dataset,
    clip_loader,
    resolve_device,
    resolve_views,
    run_model,
)

AUDIO_EXTENSIONS = (".wav",)
LIST_EXTENSIONS = (".txt", ".lst", ".list")
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".json")


@dataclass
class Predictions:
    """What :func:`predict_clips` returns.

    ``records``: the clips predicted, in input order; ``probs``: head -> (N, C)
    view-averaged probabilities; ``class_names``: head -> C names;
    ``embeddings``: (N, D) or None; ``bad``: (path, kind, reason) of each
    skipped input; ``skipped``: kind -> count.
    """

    records: list[ClipRecord]
    probs: dict[str, torch.Tensor]
    class_names: dict[str, list[str]]
    embeddings: torch.Tensor | None = None
    bad: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> dict[str, int]:
        return dict(collections.Counter(kind for _, kind, _ in self.bad))

    def top_k(self, head: str, k: int) -> tuple[torch.Tensor, list[list[str]]]:
        """(N, k) probabilities and class names of the k most likely classes."""
        p = self.probs[head]
        vals, idx = p.topk(min(k, p.shape[1]), dim=-1)
        names = self.class_names[head]
        return vals, [[names[j] for j in row] for row in idx.tolist()]


# ------------------------------------------------------------------ inputs
def collect_inputs(
    inputs: list[str | Path], modalities: tuple[str, ...] = ("audio", "video")
) -> list[ClipRecord]:
    """ClipRecords (without targets) for files, folders and list files, in the given order.

    A path that does not exist is kept (it is reported as ``missing_file``);
    a folder or list file without any media raises ValueError.
    """
    exts = VIDEO_EXTENSIONS + (AUDIO_EXTENSIONS if "video" not in modalities else ())
    out: list[ClipRecord] = []
    for item in inputs:
        p = Path(item)
        suffix = p.suffix.lower()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            if not found:
                raise ConfigError(f"{p}: no media files ({', '.join(exts)}) in this folder")
            out += [ClipRecord(path=str(f), clip_id=f.stem) for f in found]
        elif p.is_file() and suffix in LIST_EXTENSIONS:
            n0 = len(out)
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    f = Path(line) if Path(line).is_absolute() else p.parent / line
                    out.append(ClipRecord(path=str(f), clip_id=f.stem))
            if len(out) == n0:
                raise ConfigError(f"{p}: the list file names no files")
        elif p.is_file() and suffix in MANIFEST_EXTENSIONS:
            for r in read_manifest(p):
                out.append(
                    ClipRecord(path=r.path, clip_id=r.clip_id, start_s=r.start_s, end_s=r.end_s)
                )
        else:
            out.append(ClipRecord(path=str(p), clip_id=p.stem))
    if not out:
        raise ConfigError("no inputs")
    return out


# ------------------------------------------------------------------ prediction
def _with_bar(batches: Iterable[dict], total: int) -> Iterator[dict]:
    """``batches``, with a progress bar on stderr counting clips (good and bad)."""
    from tqdm import tqdm

    with tqdm(total=total, unit="clip", desc="predict", file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in batches:
            yield batch
            bar.update(batch["batch_size"] + len(batch["bad"]))


def predict_clips(
    run: LoadedRun,
    records: list[ClipRecord],
    views: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    embeddings: bool = False,
    progress: bool = True,
    num_workers: int | None = None,
) -> Predictions:
    """Multi-view predictions of ``run``'s model for ``records`` (see the module docstring;
    the loop is :func:`mmt_fast.inference.run_model`)."""
    device = resolve_device(device)
    nv = resolve_views(run.cfg, "test", views)
    ds = clip_dataset(run, records, nv, labelled=False)
    batches = clip_loader(run, ds, batch_size, num_workers)
    if progress:
        batches = _with_bar(batches, len(ds))
    out = run_model(
        run.model.to(device),
        batches,
        device,
        run.cfg.train.amp,
        ("head",) if embeddings else (),
        transform=batch_transform(ds),
    )
    emb = None
    if embeddings:
        emb = out.embeddings.get("head", torch.empty(0, 0))
    return Predictions(
        records=[ds.records[i] for i in out.index.tolist()],
        probs=out.probs,
        class_names=run.class_names,
        embeddings=emb,
        bad=[(b.path, b.kind, b.reason) for b in sorted(out.bad)],
    )


# ------------------------------------------------------------------ output
def _rows(pred: Predictions, k: int) -> tuple[list[str], list[dict]]:
    seg = any(r.start_s is not None or r.end_s is not None for r in pred.records)
    cols = ["path"] + (["start_s", "end_s"] if seg else [])
    tops = {h: pred.top_k(h, k) for h in pred.probs}
    for h, (vals, _) in tops.items():
        for j in range(vals.shape[1] if len(vals) else min(k, len(pred.class_names[h]))):
            sfx = "" if j == 0 else f"_{j + 1}"
            cols += [f"{h}{sfx}", f"{h}_prob{sfx}"]
    rows = []
    for i, r in enumerate(pred.records):
        row: dict = {"path": r.path}
        if seg:
            row.update(start_s=r.start_s, end_s=r.end_s)
        for h, (vals, names) in tops.items():
            for j, (name, v) in enumerate(zip(names[i], vals[i].tolist())):
                sfx = "" if j == 0 else f"_{j + 1}"
                row[f"{h}{sfx}"] = name
                row[f"{h}_prob{sfx}"] = round(v, 6)
        rows.append(row)
    return cols, rows


def write_predictions(pred: Predictions, out: str | Path | None, top_k: int = 1) -> str:
    """Write CSV (``.csv`` or ``out=None`` -> returned text for stdout) or JSONL (``.jsonl``).

    CSV columns: ``path`` [``start_s,end_s``], then per head ``H, H_prob`` for the
    best class and ``H_2, H_prob_2``... for the next ones (``H`` is ``label``,
    or ``verb``/``noun``). JSONL: one object a clip with the same keys.
    """
    cols, rows = _rows(pred, top_k)
    if out is not None and Path(out).suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif out is None or Path(out).suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        text = buf.getvalue()
    else:
        raise ConfigError(f"--out {out}: use a .csv or .jsonl file")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text
