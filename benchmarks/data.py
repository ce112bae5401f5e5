"""Data-loader throughput: clips/s per worker at the paper's settings, and where the time goes.

    python -m benchmarks.data [--quick] [--cache DIR] [--json PATH] [--compare REF]

Settings (the paper's): 16 frames at 224x224 with stride 4 (a 61-frame window),
a 128x1024 log-mel fbank; ``train`` = one random window, crop, flip and
SpecAugment; ``test`` = 5 views. Sources, generated here with PyAV (H.264,
AAC stereo) into ``--cache`` (default: a folder under the system temp dir,
reused between runs, never committed):

| kind | size | fps | keyframe every | audio |
|---|---|---|---|---|
| ``360p-10s`` | 640x360 | 25 | 2 s | AAC 44.1 kHz stereo |
| ``720p-10s`` | 1280x720 | 30 | 5 s | AAC 48 kHz stereo |
| ``360p-90s`` | 640x360 | 30 | 3 s | AAC 48 kHz stereo |

The content is moving, textured (noise over gradients and shapes), so the
codec does real work. One process, one decoding thread, ``torch`` on one
thread: the figure is clips/s **per DataLoader worker** (``AVClipDataset[i]``,
the median over :data:`ITEMS` items per row (9 training and 5 test items with
``--quick``, after one warm-up item) of the CPU time per clip; the median wall
time is recorded beside it: on a shared machine it also counts other people's
work, and a worker with a core to itself gets the CPU figure). The JSON's
``env`` names the CPU model; CPU time per item differs between CPU models and
with the machine's load (``load_average``), so compare rows of one file.
``after`` is the current code; ``before`` is the code of
git revision ``--before`` (default: the commit before the loader was made
faster; ``git archive REF mmt_fast`` into a temporary folder, run in a child
process on the same items); when that revision is not available, ``before``
is the current code with the old settings (``decoder_resize: false``,
``audio_span: false``). The per-stage breakdown runs ``AVClipDataset[0]`` itself
and adds up the CPU time of the functions it calls per stage
(:func:`stage_clock`: probe/open, decode (seeking included), resize/transform,
audio decode, fbank, and ``other`` for the rest), for the current code with
the old and the new settings. Results go to ``benchmarks/results/data_cpu.json`` (``--json`` to change);
``python -m benchmarks.report`` puts them in docs/benchmarks.md.

Prepared sources (``mmt-fast prepare``, :mod:`mmt_fast.data.prepare`): each
source is also prepared once into ``--cache`` with the settings the paper's
recipe gives (training: short side 320, a keyframe every 16 frames, 3
non-reference B-frames between reference frames; test-only: short side 224) and
timed the same way (the loader decodes them with ``video.PacketReader``, which
skips the B-frames no sampled frame needs): training
items from the 320 px copies, 5-view test items from the 224 px copies, with the CPU transforms and with
``data.device_transforms`` (the loader stops after decoding and copying the
audio window's samples; the fbank, crop, normalisation and SpecAugment that then
run on the training device are not counted). ``rows`` in the JSON has one entry per (source, mode, prepared,
code, device_transforms) with ``clips_per_s`` (per worker).

The demand side (``demand`` in the JSON): the clips/s a GPU consumes when
training each model preset. With CUDA, measured (forward + backward in bf16
autocast, batch 8, after warm-up); without, read from the step model
(``benchmarks/results/step_model.json``, :mod:`benchmarks.step_model`: one
training step traced op by op, each at its roofline on an H200 or A100, with
element-wise chains fused as a compiler would: the fastest step it models, so
the most clips/s the loader must supply); presets it does not model (AST) fall
back to the forward multiply-adds per clip (``flops_memory_cpu.json``) as
``3 x 2 x MACs`` FLOPs per training clip at a stated MFU (H200 790 TFLOP/s bf16
dense at 30%, A100 312 at 35%). Workers per GPU = that rate / one worker's
training clips/s.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as _dt
import fractions
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BEFORE_REF = "61d459a"  # the last commit before the loader was made faster

KINDS = {
    # name: (width, height, fps, seconds, keyframe interval s, audio rate)
    "360p-10s": (640, 360, 25, 10.0, 2.0, 44100),
    "720p-10s": (1280, 720, 30, 10.0, 5.0, 48000),
    "360p-90s": (640, 360, 30, 90.0, 3.0, 48000),
}
QUICK_SECONDS = {"360p-90s": 60.0}  # --quick: a 60 s long clip


def _frames(w: int, h: int, n: int, seed: int):
    """Moving textured frames: a drifting colour gradient, a bouncing box, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tex = np.stack(
        [
            128 + 100 * np.sin(xx / 97.0),
            128 + 100 * np.sin(yy / 53.0),
            128 + 100 * np.sin((xx + yy) / 151.0),
        ],
        -1,
    ).astype(np.uint8)
    noise = rng.integers(0, 24, (4, h, w, 3), dtype=np.uint8)
    for i in range(n):
        f = np.roll(tex, (2 * i, 3 * i), axis=(0, 1)) + noise[i % 4]
        bx, by = (37 * i) % max(w - w // 5, 1), (23 * i) % max(h - h // 5, 1)
        f[by : by + h // 5, bx : bx + w // 5] = (255 - 4 * (i % 60), 40, 200)
        yield f


def make_source(path: Path, kind: str, seconds: float, seed: int = 0) -> Path:
    """Write one benchmark source (see the module docstring) with PyAV."""
    import av

    w, h, fps, _, gop_s, rate = KINDS[kind]
    tmp = path.with_name(f".tmp-{path.name}")
    with av.open(str(tmp), "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        g = round(gop_s * fps)
        vs.options = {
            "preset": "veryfast",
            "crf": "23",
            "g": str(g),
            "keyint_min": str(g),
            "sc_threshold": "0",
            "threads": "2",
        }
        a = c.add_stream("aac", rate=rate)
        a.layout = "stereo"
        for f in _frames(w, h, round(seconds * fps), seed):
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        rng = np.random.default_rng(seed)
        t = np.arange(round(seconds * rate)) / rate
        x = 0.2 * np.sin(2 * np.pi * (220 + 30 * np.sin(t)) * t) + 0.05 * rng.standard_normal(
            t.size
        )
        x = np.stack([x, 0.7 * x]).astype(np.float32)
        for s in range(0, x.shape[1], 1024):
            fr = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(x[:, s : s + 1024]), format="fltp", layout="stereo"
            )
            fr.sample_rate, fr.pts, fr.time_base = rate, s, fractions.Fraction(1, rate)
            for p in a.encode(fr):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    os.replace(tmp, path)
    return path


def sources(cache: Path, quick: bool, per_kind: int) -> dict[str, list[Path]]:
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {}
    for kind, spec in KINDS.items():
        seconds = QUICK_SECONDS.get(kind, spec[3]) if quick else spec[3]
        out[kind] = []
        for i in range(per_kind):
            p = cache / f"{kind}-{int(seconds)}s-{i}.mp4"
            if not p.is_file():
                t0 = time.perf_counter()
                make_source(p, kind, seconds, seed=i)
                print(f"  wrote {p.name} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            out[kind].append(p)
    return out


# ---------------------------------------------------------------- measuring
def _config(mode: str, pipeline: str):
    from mmt_fast.data import DataConfig

    kw = {"mode": mode, "num_views": 5}
    if pipeline == "before":
        kw.update(decoder_resize=False, audio_span=False)
    if pipeline == "device":  # crop, flip, normalisation, SpecAugment left to the device
        kw.update(device_transforms=True)
    return DataConfig(**kw)


def time_items(paths: list[Path], mode: str, pipeline: str, items: int) -> dict:
    """Clips/s of ``AVClipDataset[i]`` in this process (one worker's view)."""
    import torch

    from mmt_fast.data import AVClipDataset, ClipRecord

    recs = [ClipRecord(str(p), p.stem, label="x") for p in paths]
    ds = AVClipDataset(recs, _config(mode, pipeline))
    torch.manual_seed(0)
    ds[0]  # warm-up: imports, page cache
    wall, cpu = [], []
    for i in range(items):
        t0, c0 = time.perf_counter(), time.process_time()
        item = ds[i % len(ds)]
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        assert isinstance(item, dict), item
    med = float(np.median(cpu))
    return {
        "items": items,
        "median_cpu_s": med,
        "median_wall_s": float(np.median(wall)),
        "clips_per_s": 1.0 / med,
    }


_clock = time.process_time  # CPU seconds: a shared machine's load does not inflate them

# the functions AVClipDataset's loading code calls, per stage (module, attribute)
STAGES = {
    "probe_open": (("video", "open_clip"), ("video", "open_video"), ("video", "frame_times")),
    "decode": (("video", "decode_frames"),),
    "resize_transform": (("video", "transform_frames"),),
    "audio_decode": (("audio", "open_audio"), ("audio", "preload")),
    "fbank": (("audio", "window_fbank"), ("audio", "window_wave"), ("audio", "spec_augment"),
              ("audio", "normalize_fbank")),
}  # fmt: skip


@contextlib.contextmanager
def stage_clock():
    """Within the block, the functions of :data:`STAGES` add their CPU time to the dict
    yielded (outermost calls only: a stage calling another is counted once), so that
    the dataset's own code is timed, not a copy of it."""
    import importlib

    totals: dict[str, float] = collections.defaultdict(float)
    depth = [0]
    saved = []

    def timed(stage, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            c0 = _clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[stage] += _clock() - c0
                depth[0] -= 1

        return call

    for stage, targets in STAGES.items():
        for mod_name, attr in targets:
            mod = importlib.import_module(f"mmt_fast.data.{mod_name}")
            if hasattr(mod, attr):  # (an older revision may lack one)
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, timed(stage, getattr(mod, attr)))
    try:
        yield totals
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


def breakdown(path: Path, mode: str, pipeline: str, reps: int) -> dict[str, float]:
    """Median CPU seconds per item of each stage of ``AVClipDataset[0]`` on ``path`` (the
    dataset's own code, timed by :func:`stage_clock`), plus ``other`` (the rest of the item:
    indexing, targets, stacking)."""
    import torch

    from mmt_fast.data import AVClipDataset, ClipRecord

    ds = AVClipDataset([ClipRecord(str(path), path.stem, label="x")], _config(mode, pipeline))
    per: dict[str, list[float]] = {k: [] for k in (*STAGES, "other")}
    torch.manual_seed(0)
    for _ in range(reps):
        with stage_clock() as t:
            c0 = _clock()
            item = ds[0]
            total = _clock() - c0
        assert isinstance(item, dict), item
        for k in STAGES:
            per[k].append(t.get(k, 0.0))
        per["other"].append(max(total - sum(t.values()), 0.0))
    return {k: float(np.median(v)) for k, v in per.items()}


ITEMS = {True: {"train": 9, "test": 5}, False: {"train": 20, "test": 8}}  # per row: quick / full


def _line(key: str, r: dict) -> str:
    return (
        f"  {key:32s} {r['clips_per_s']:7.2f} clips/s per worker ({r['median_cpu_s'] * 1e3:.0f} "
        f"ms CPU, {r['median_wall_s'] * 1e3:.0f} ms wall per clip; median of {r['items']})"
    )


def measure(cache: Path, quick: bool, pipelines: list[str]) -> dict:
    src = sources(cache, quick, 2)
    res: dict = {}
    for kind, paths in src.items():
        for mode in ("train", "test"):
            for pipe in pipelines:
                key = f"{kind}/{mode}/{pipe}"
                res[key] = time_items(paths, mode, pipe, ITEMS[quick][mode])
                print(_line(key, res[key]), file=sys.stderr)
    return res


# ---------------------------------------------------------------- before = old code
def measure_ref(ref: str, cache: Path, quick: bool) -> dict:
    """Time the items with the ``mmt_fast`` package of git revision ``ref``."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        tar = subprocess.run(
            ["git", "-C", str(root), "archive", ref, "mmt_fast", "kernels"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", d], input=tar, check=True)
        out = Path(d) / "ref.json"
        # a copy of this script beside the old packages: its folder comes first on sys.path
        child = Path(d) / "bench_data_child.py"
        child.write_text(Path(__file__).read_text())
        cmd = [
            sys.executable,
            str(child),
            "--_items-only",
            str(out),
            "--cache",
            str(cache),
        ] + (["--quick"] if quick else [])
        env = {**os.environ, "PYTHONPATH": d}
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def _env() -> dict:
    import torch

    import mmt_fast

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import av
    import decord

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "decord": decord.__version__,
        "av": av.__version__,
        "mmt_fast": getattr(mmt_fast, "__version__", "?"),
    }


# ---------------------------------------------------------------- prepared sources
PREPARED = {"train": 320, "test": 224}  # short side per mode (DataConfig paper: 320 / crop 224)


def prepared_sources(cache: Path, src: dict[str, list[Path]], mode: str) -> tuple[dict, dict]:
    """The sources prepared for ``mode`` (resumable: reused between runs) and the seconds
    (wall) the preparing took per kind (0 when reused)."""
    from mmt_fast.data import ClipRecord, data_config, read_manifest
    from mmt_fast.data.prepare import prepare_dataset, settings_for

    settings = settings_for(data_config("paper"), train=mode == "train")
    assert settings.short_side == PREPARED[mode]
    out, secs = {}, {}
    for kind, paths in src.items():
        dest = cache / f"prepared-{settings.short_side}" / f"{kind}-{paths[0].stem.split('-')[2]}"
        recs = [ClipRecord(str(p), p.stem, label="x") for p in paths]
        t0 = time.perf_counter()
        rep = prepare_dataset(recs, dest, settings, workers=1, progress=False, log=lambda s: None)
        secs[kind] = time.perf_counter() - t0 if rep["prepared"] else 0.0
        out[kind] = [Path(r.path) for r in read_manifest(dest / "manifest.csv")]
        bad = rep["unusable_counts"]
        assert not bad, f"prepare failed for {kind}: {rep['unusable']}"
    return out, secs


# ---------------------------------------------------------------- demand side
GPUS = {"H200": (790.0, 0.30), "A100": (312.0, 0.35)}  # bf16 dense TFLOP/s, MFU assumed
DEMAND_PRESETS = {  # preset -> the row of flops_memory_cpu.json with its forward GMACs
    "MMT": "MMT",
    "ablation/video-only": "MViTv2-B-16",
    "ablation/audio-only": "MAT",
    "AST": "AST",
}


def demand_estimates(gmacs: dict[str, float]) -> list[dict]:
    """Clips/s a GPU consumes training each preset, from its forward GMACs per clip."""
    rows = []
    for preset, macs in gmacs.items():
        tflop = 3 * 2 * macs / 1000  # forward + backward ~ 3x forward, 2 FLOPs per MAC
        for gpu, (peak, mfu) in GPUS.items():
            rows.append({
                "preset": preset, "gpu": gpu, "gmacs_fwd": macs, "tflop_per_clip": tflop,
                "peak_tflops": peak, "mfu": mfu, "clips_per_s": peak * mfu / tflop,
                "method": f"estimate ({mfu:.0%} MFU of {peak:.0f} TFLOP/s bf16)",
            })  # fmt: skip
    return rows


def demand_from_step_model(path: Path | None = None) -> list[dict]:
    """Clips/s per GPU from the step model's JSON (its ``fused`` variant), for the presets
    it models; the rest from :func:`demand_estimates`."""
    path = path or Path(__file__).parent / "results" / "step_model.json"
    models = json.loads(path.read_text())["models"] if path.exists() else {}
    rows, rest = [], {}
    gmacs = _gmacs_from_results()
    for preset, model in DEMAND_PRESETS.items():
        if model not in models:
            if preset in gmacs:
                rest[preset] = gmacs[preset]
            continue
        m = models[model]["variants"]["fused"]
        for gpu in GPUS:
            rows.append({
                "preset": preset, "gpu": gpu, "clips_per_s": m[gpu]["clips_per_s"],
                "step_ms": m[gpu]["step_ms"], "batch": models[model]["batch"],
                "method": f"step model ({path.name}: roofline per op, element-wise fused)",
            })  # fmt: skip
    return rows + demand_estimates(rest)


def _gmacs_from_results() -> dict[str, float]:
    res = json.loads((Path(__file__).parent / "results" / "flops_memory_cpu.json").read_text())
    by_model = {r["model"]: r["gflops"] for r in res["rows"]}
    return {p: by_model[m] for p, m in DEMAND_PRESETS.items() if m in by_model}


def measure_gpu(
    presets: list[str], batch: int = 8, steps: int = 10, device: str = "cuda"
) -> list[dict]:
    """Training clips/s on this machine's GPU (forward + backward, bf16 autocast, random
    inputs of the preset's sizes); a preset that fails is reported with its error."""
    import torch

    from mmt_fast.config import get_config
    from mmt_fast.registry import build

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for preset in presets:
        try:
            cfg = get_config(preset)
            model = build(cfg).to(dev).train()
            inputs = {}
            if getattr(cfg, "audio", None) is not None:
                f, t = cfg.audio.input_size
                inputs["audio"] = torch.randn(batch, 1, f, t, device=dev)
            if getattr(cfg, "video", None) is not None:
                t, h, w = cfg.video.input_size
                inputs["video"] = torch.randn(batch, 3, t, h, w, device=dev)
            if not inputs:  # an encoder preset (AST): one spectrogram input
                f, t = cfg.input_size
                inputs = {"x": torch.randn(batch, 1, f, t, device=dev)}
            for _ in range(2):
                _train_step(model, inputs, dev.type)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                _train_step(model, inputs, dev.type)
            sync()
            rate = batch * steps / (time.perf_counter() - t0)
            rows.append({"preset": preset, "gpu": name, "clips_per_s": rate,
                         "method": f"measured (bf16 autocast, batch {batch})"})  # fmt: skip
            del model
        except Exception as e:  # report, keep measuring the others
            rows.append({"preset": preset, "gpu": name, "clips_per_s": float("nan"),
                         "method": f"failed: {type(e).__name__}: {e}"[:200]})  # fmt: skip
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _train_step(model, inputs: dict, device_type: str) -> None:
    import torch

    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = model(**inputs) if "x" not in inputs else model(inputs["x"])
    sum(v.float().mean() for v in _tensors(out)).backward()


def _tensors(out):
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in _tensors(getattr(out, f.name))]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _tensors(v)]
    return []


def workers_per_gpu(clips_per_s_per_worker: float, gpu_clips_per_s: float = 40.0) -> float:
    """Workers one GPU needs to be fed ``gpu_clips_per_s`` (tens of clips/s for MMT)."""
    return gpu_clips_per_s / clips_per_s_per_worker


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer items, a 60 s long clip")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "mmt_fast_bench_data"))
    p.add_argument("--json", default=None, help="default: benchmarks/results/data_cpu.json")
    p.add_argument(
        "--before",
        default=BEFORE_REF,
        metavar="REF",
        help="git revision timed as 'before' ('' for the old settings instead)",
    )
    p.add_argument("--gpu-clips-per-s", type=float, default=40.0)
    p.add_argument("--_items-only", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _measure_before(a: argparse.Namespace, cache: Path, items: dict) -> str:
    """Add the ``before`` rows to ``items``; what ``before`` is."""
    if a.before:
        print(f"[data bench] clips/s per worker with the code of {a.before}", file=sys.stderr)
        try:
            ref = measure_ref(a.before, cache, a.quick)
            items.update({k.replace("/ref", "/before"): v for k, v in ref.items()})
            return f"git revision {a.before}"
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"  cannot time {a.before} ({e}); using the old settings", file=sys.stderr)
    items.update(measure(cache, a.quick, ["before"]))
    return "old settings of the current code"


def _measure_stages(src: dict, reps: int) -> dict:
    print("[data bench] CPU time per clip by stage (ms)", file=sys.stderr)
    stages: dict = {}
    for kind, paths in src.items():
        for mode in ("train", "test"):
            for pipe in ("before", "after"):
                b = breakdown(paths[0], mode, pipe, reps)
                stages[f"{kind}/{mode}/{pipe}"] = b
                print(f"  {kind}/{mode}/{pipe:6s} " + _stage_text(b), file=sys.stderr)
    return stages


def _stage_text(b: dict) -> str:
    return " ".join(f"{k} {v * 1000:.0f}" for k, v in b.items())


def _measure_prepared(cache: Path, src: dict, quick: bool, items: dict, stages: dict) -> dict:
    """Time the prepared copies (plain and with device transforms); the prepare seconds."""
    print("[data bench] prepared sources (mmt-fast prepare)", file=sys.stderr)
    prepared, prepare_s = {}, {}
    for mode in ("train", "test"):
        prepared[mode], prepare_s[mode] = prepared_sources(cache, src, mode)
    for kind in src:
        for mode in ("train", "test"):
            paths, key = prepared[mode][kind], f"{kind}/{mode}/prepared"
            items[key] = time_items(paths, mode, "after", ITEMS[quick][mode])
            items[key + "+device"] = time_items(paths, mode, "device", ITEMS[quick][mode])
            stages[key] = breakdown(paths[0], mode, "after", 1 if quick else 3)
            stages[key + "+device"] = breakdown(paths[0], mode, "device", 1 if quick else 3)
            print(_line(key, items[key]), file=sys.stderr)
            print(_line(key + "+device", items[key + "+device"]), file=sys.stderr)
            print(f"    stages: {_stage_text(stages[key])}", file=sys.stderr)
    return prepare_s


def _rows(src: dict, items: dict) -> list[dict]:
    rows = []
    for kind in src:
        for mode in ("train", "test"):
            for pipe, prep in (("before", False), ("after", False), ("prepared", True),
                               ("prepared+device", True)):  # fmt: skip
                r = items[f"{kind}/{mode}/{pipe}"]
                rows.append({
                    "source": kind, "mode": mode, "prepared": prep,
                    "code": "before" if pipe == "before" else "after",
                    "device_transforms": pipe.endswith("+device"),
                    "short_side": PREPARED[mode] if prep else None,
                    "clips_per_s": r["clips_per_s"], "median_cpu_s": r["median_cpu_s"],
                    "median_wall_s": r["median_wall_s"], "items": r["items"],
                })  # fmt: skip
    return rows


def _demand(rows: list[dict]) -> list[dict]:
    print("[data bench] GPU demand", file=sys.stderr)
    import torch

    if torch.cuda.is_available():
        demand = measure_gpu(list(DEMAND_PRESETS))
    else:
        demand = demand_from_step_model()
    rate = {
        (r["source"], r["mode"], r["prepared"], r["code"], r["device_transforms"]): r["clips_per_s"]
        for r in rows
    }
    for d in demand:
        d["workers_per_gpu"] = {
            "360p-10s": d["clips_per_s"] / rate[("360p-10s", "train", False, "after", False)],
            "360p-10s prepared": d["clips_per_s"]
            / rate[("360p-10s", "train", True, "after", False)],
            "360p-10s prepared, device transforms": d["clips_per_s"]
            / rate[("360p-10s", "train", True, "after", True)],
        }
        print(
            f"  {d['preset']:22s} {d['gpu']:5s} {d['clips_per_s']:7.1f} clips/s ({d['method']}); "
            f"workers per GPU: {d['workers_per_gpu']['360p-10s']:.0f} unprepared, "
            f"{d['workers_per_gpu']['360p-10s prepared']:.0f} prepared, "
            f"{d['workers_per_gpu']['360p-10s prepared, device transforms']:.0f} with device "
            "transforms",
            file=sys.stderr,
        )
    return demand


def _summary(src: dict, items: dict, gpu_clips_per_s: float, before_is: str) -> dict:
    summary = {}
    for kind in src:
        for mode in ("train", "test"):
            b = items[f"{kind}/{mode}/before"]["clips_per_s"]
            f = items[f"{kind}/{mode}/after"]["clips_per_s"]
            pr = items[f"{kind}/{mode}/prepared"]["clips_per_s"]
            prd = items[f"{kind}/{mode}/prepared+device"]["clips_per_s"]
            summary[f"{kind}/{mode}"] = {
                "before": b, "after": f, "speedup": f / b, "prepared": pr,
                "prepared_speedup": pr / f, "prepared_device_transforms": prd,
                "workers_per_gpu": workers_per_gpu(f, gpu_clips_per_s),
            }  # fmt: skip
    print(f"\nclips/s per worker (CPU time); before = {before_is}", file=sys.stderr)
    print(
        "| source / mode | before | after | speed-up | prepared | vs after | + device transforms |",
        file=sys.stderr,
    )
    for k, r in summary.items():
        print(
            f"| {k} | {r['before']:.2f} | {r['after']:.2f} | {r['speedup']:.1f}x | "
            f"{r['prepared']:.2f} | {r['prepared_speedup']:.1f}x | "
            f"{r['prepared_device_transforms']:.2f} |",
            file=sys.stderr,
        )
    return summary


def _settings(a: argparse.Namespace) -> dict:
    return {
        "num_frames": 16, "stride": 4, "crop": 224, "fbank": [128, 1024], "test_views": 5,
        "quick": a.quick, "items": ITEMS[a.quick], "torch_threads": 1, "decode_threads": 1,
        "gpu_clips_per_s": a.gpu_clips_per_s,
    }  # fmt: skip


def _sources_info(quick: bool) -> dict:
    return {
        k: {"width": v[0], "height": v[1], "fps": v[2],
            "seconds": QUICK_SECONDS.get(k, v[3]) if quick else v[3], "keyframe_s": v[4],
            "audio_hz": v[5]}
        for k, v in KINDS.items()
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    import torch

    torch.set_num_threads(1)
    cache = Path(a.cache)
    if a._items_only:  # a child timing another revision's code
        Path(a._items_only).write_text(json.dumps(measure(cache, a.quick, ["ref"])))
        return 0
    t_start, load0 = time.perf_counter(), os.getloadavg()
    print("[data bench] sources", file=sys.stderr)
    src = sources(cache, a.quick, 2)
    print("[data bench] clips/s per worker (one process, one thread)", file=sys.stderr)
    items = measure(cache, a.quick, ["after"])
    before_is = _measure_before(a, cache, items)
    stages = _measure_stages(src, 1 if a.quick else 3)
    prepare_s = _measure_prepared(cache, src, a.quick, items, stages)
    rows = _rows(src, items)
    demand = _demand(rows)
    summary = _summary(src, items, a.gpu_clips_per_s, before_is)
    load1 = os.getloadavg()
    print(f"load average (1, 5, 15 min): {load0} at the start, {load1} at the end",
          file=sys.stderr)  # fmt: skip
    out = {
        "env": _env(), "settings": _settings(a), "sources": _sources_info(a.quick),
        "rows": rows, "demand": demand,
        "prepared_settings": {"short_side": PREPARED, "gop": 16, "bframes": 3,
                              "prepare_seconds": prepare_s},
        "load_average": {"start": load0, "end": load1}, "clips_per_s_per_worker": items,
        "stages_s": stages, "before_is": before_is, "summary": summary,
        "seconds": time.perf_counter() - t_start,
    }  # fmt: skip
    dest = Path(a.json) if a.json else Path(__file__).parent / "results" / "data_cpu.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"[data bench] wrote {dest} ({out['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
