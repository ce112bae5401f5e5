"""Shards and index as one unit under faults: a re-pack killed at each stage, shards
that do not match their index (truncated, damaged, another set's), an index without
splits serving train and test.

The clips are solid colours whose label is their colour's name, so a decoded
clip's pixels say which label it must carry (the reference is the picture, not
the index).
"""

import csv
import json
import os
import shutil
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers_media import solid_clip

from mmt_fast.cli import main
from mmt_fast.data import data_config
from mmt_fast.data.errors import ShardError
from mmt_fast.data.manifests import ClassIndex
from mmt_fast.data.shards import ShardClips, ShardIndex, ShardStream, write_shards

COLOURS = {
    "red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230),
    "yellow": (230, 230, 20), "cyan": (20, 230, 230), "magenta": (230, 20, 230),
}  # fmt: skip
NAMES = ClassIndex(sorted(COLOURS))
DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"


def _manifest(path, names):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([f"{n}.mp4", n, "train"] for n in names)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Set A: the six clips in one order; set B: five of them in the reverse order (so a
    key of B names another clip than the same key of A). Both packed one clip per shard."""
    root = tmp_path_factory.mktemp("colours")
    for n, rgb in COLOURS.items():
        solid_clip(root / f"{n}.mp4", rgb, num_frames=8)
    a = _manifest(root / "a.csv", list(COLOURS))
    b = _manifest(root / "b.csv", list(COLOURS)[::-1][:5])
    packed = root / "packed_a"
    write_shards(a, packed, max_shard_bytes=1, progress=False)
    return root, a, b, packed


def _colour_of(video):
    """The name of the colour nearest to a decoded, normalised clip's mean pixel."""
    dc = data_config("tiny")
    mean = video.float().mean(dim=tuple(d for d in range(video.dim()) if d != video.dim() - 4))
    rgb = (mean.numpy() * np.array(dc.std) + np.array(dc.mean)) * 255
    return min(COLOURS, key=lambda n: np.abs(np.array(COLOURS[n]) - rgb).sum())


def _check_every_label(index_dir):
    """Stream (train mode) and read (test mode) every clip: each carries its picture's label."""
    train = ShardClips(index_dir, None, data_config("tiny", modalities="video"), class_index=NAMES)
    stream = ShardStream(train, seed=3, batch_size=1, num_workers=0, shuffle_buffer=2)
    test = ShardClips(
        index_dir, None, data_config("tiny", mode="test", modalities="video"), class_index=NAMES
    )
    items = list(stream) + [test[i] for i in range(len(test))]
    assert items and all(isinstance(x, dict) for x in items)
    for x in items:
        assert NAMES.names[int(x["label"])] == _colour_of(x["video"])
    return len(test)


def _repack_killed_at(stage, manifest, out):
    """Re-pack ``manifest`` into ``out`` in a forked child SIGKILLed at ``stage``."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, a hard exit
        code = 1
        try:
            os.environ["MMT_FAST_SHARDS_KILL_AT"] = stage
            write_shards(manifest, out, max_shard_bytes=1, progress=False)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize(
    "stage, survivor",
    [
        ("first_shard", "a"),
        ("shards_written", "a"),
        ("index_written", "a"),
        ("switched", "b"),
        ("never", "b"),
    ],
)
def test_killed_repack_leaves_one_whole_set(clips, tmp_path, stage, survivor):
    _, _, b, packed = clips
    out = tmp_path / "shards"
    shutil.copytree(packed, out)
    status = _repack_killed_at(stage, b, out)
    if stage == "never":
        assert os.WEXITSTATUS(status) == 0
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    index = ShardIndex.load(out)
    assert len(index.samples) == (6 if survivor == "a" else 5)
    assert _check_every_label(out) == len(index.samples)
    # the next re-pack removes what the killed one left
    write_shards(b, out, max_shard_bytes=1, progress=False)
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1
    assert _check_every_label(out) == 5


def _copy(packed, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(packed, out)
    return out, ShardIndex.load(out)


def test_truncated_shard_is_named_when_the_index_loads(clips, tmp_path):
    out, index = _copy(clips[3], tmp_path)
    path = index.shard_path(2)
    path.write_bytes(path.read_bytes()[:-1024])
    with pytest.raises(ShardError, match=f"shard {path} holds .* bytes"):
        ShardIndex.load(out)
    path.unlink()
    with pytest.raises(ShardError, match=f"shard {path} named by"):
        ShardIndex.load(out)


def test_damaged_shard_fails_its_hash(clips, tmp_path):
    """One byte of a clip's media changed (same size): streaming and verify() name the shard."""
    out, index = _copy(clips[3], tmp_path)
    s = index.samples[0]
    path = index.shard_path(s["shard"])
    off, size = s["members"]["mp4"]
    data = bytearray(path.read_bytes())
    data[off + size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    index = ShardIndex.load(out)  # the size is right
    index.verify(1)
    with pytest.raises(ShardError, match=f"shard {path}: its SHA-256"):
        index.verify(s["shard"])
    dc = data_config("tiny", modalities="video", on_error="skip")
    clips_ = ShardClips(out, None, dc, class_index=NAMES)
    stream = ShardStream(clips_, seed=0, batch_size=1, num_workers=0, shuffle=False)
    with pytest.raises(ShardError, match=f"shard {path}: its SHA-256"):
        list(stream)


def test_another_sets_shard_under_this_index_is_refused(clips, tmp_path):
    """The original fault, forced: another set's tar in place and the index's size and hash
    edited to match it. Each sample's stored metadata still tells it apart."""
    _, _, b, packed = clips
    out, index = _copy(packed, tmp_path)
    other = tmp_path / "other"
    write_shards(b, other, max_shard_bytes=1, progress=False)
    foreign = ShardIndex.load(other)
    d = json.loads((out / "index.json").read_text())
    d["shards"][0]["bytes"] = foreign.shards[0]["bytes"]
    d["shards"][0]["sha256"] = foreign.shards[0]["sha256"]
    shutil.copy(foreign.shard_path(0), index.shard_path(0))
    s0 = d["samples"][0]
    with tarfile.open(index.shard_path(0)) as tar:  # the foreign sample's member offsets
        s0["members"] = {m.name.split(".", 1)[1]: [m.offset_data, m.size] for m in tar}
    (out / "index.json").write_text(json.dumps(d))
    index = ShardIndex.load(out)
    with pytest.raises(ShardError, match="sample 00000000 is not the one its index"):
        index.read_sample(0)
    dc = data_config("tiny", modalities="video")
    stream = ShardStream(ShardClips(out, None, dc, class_index=NAMES), 0, 1, 0, shuffle=False)
    with pytest.raises(ShardError, match="is not the one its index"):
        list(stream)


def test_version_1_index_is_refused(clips, tmp_path):
    out, _ = _copy(clips[3], tmp_path)
    d = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**d, "version": 1}))
    with pytest.raises(ShardError.__mro__[1], match="version-1 shard index"):
        ShardIndex.load(out)


def test_shards_without_splits_serving_train_and_test_are_refused(clips, tmp_path, capsys):
    """As the manifest path refuses one list without a split column for several splits."""
    root = clips[0]
    nosplit = tmp_path / "nosplit.csv"
    with open(nosplit, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"]] + [[root / f"{n}.mp4", n] for n in COLOURS])
    index = write_shards(nosplit, tmp_path / "shards", progress=False)
    assert json.loads(index.read_text())["split"] is None
    lines = {}
    for fmt, path in (("webdataset", index), ("manifest", nosplit)):
        keys = [f"data.{s}={path}" for s in ("train", "val", "test")]
        out = [f"train.out_dir={tmp_path / fmt}", "train.progress=false", "data.cache=false"]
        rc = main(["train", "--config", str(DEMO), f"data.format={fmt}", *keys, *out])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 3 and "data error" in line and "no 'split' column" in line, line
        lines[fmt] = line.replace(str(path), "PATH")
    assert lines["webdataset"] == lines["manifest"]


def _shard_keys(index, tmp_path):
    keys = {f"data.{s}": str(index) for s in ("train", "val", "test")}
    keys |= {"data.val_split": "train", "data.test_split": "train"}
    return [f"{k}={v}" for k, v in keys.items()] + [
        "data.format=webdataset", "data.cache=false", f"train.out_dir={tmp_path / 'run'}",
        "train.progress=false", "data.num_workers=0",
    ]  # fmt: skip


def _check_data(index, tmp_path, capsys, *extra):
    rc = main(["check-data", "--config", str(DEMO), "--workers", "0", "--no-progress",
               *_shard_keys(index, tmp_path), *extra])  # fmt: skip
    return rc, capsys.readouterr().err


def test_check_data_reads_the_shards_not_the_sources(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for n, rgb in COLOURS.items():
        solid_clip(src / f"{n}.mp4", rgb, num_frames=8)
    index = write_shards(_manifest(src / "m.csv", COLOURS), tmp_path / "sh", max_shard_bytes=1,
                         progress=False)  # fmt: skip
    shutil.rmtree(src)  # the shards hold the clips: training and check-data need no source
    rc, err = _check_data(index, tmp_path, capsys, "--split", "train")
    assert rc == 0 and "train: 6 clips, 0 unusable" in err, err


def test_damaged_shard_is_named_by_check_data(clips, tmp_path, capsys):
    out, index = _copy(clips[3], tmp_path)
    s = index.samples[4]
    path = index.shard_path(s["shard"])
    data = bytearray(path.read_bytes())
    data[s["members"]["mp4"][0] + 300] ^= 0xFF  # same size: only the hash tells
    path.write_bytes(bytes(data))
    rc, err = _check_data(out, tmp_path, capsys, "--split", "train")
    line = err.strip().splitlines()[-1]
    assert rc == 3 and "train: 6 clips, 1 unusable (corrupt_file 1)" in err, err
    assert f"first: {path}: shard {path}: its SHA-256" in line, line


@pytest.mark.parametrize("which", ["train", "val"])
def test_truncated_shard_is_named_by_check_data_and_training(clips, tmp_path, capsys, which):
    """The same one-line data error (exit 3) from check-data and from training, whether the
    damaged shard is the training set's or the validation set's."""
    out, _ = _copy(clips[3], tmp_path)
    val = tmp_path / "val"
    shutil.copytree(clips[3], val)
    damaged = ShardIndex.load(out if which == "train" else val).shard_path(3)
    damaged.write_bytes(damaged.read_bytes()[:5000])
    keys = [*_shard_keys(out, tmp_path), f"data.val={val}"]
    want = f"data error: shard {damaged} holds 5000 bytes"
    rc, err = _check_data(out, tmp_path, capsys, f"data.val={val}")
    assert rc == 3 and want in err.strip().splitlines()[-1], err
    rc = main(["train", "--config", str(DEMO), *keys])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 3 and want in line, line


def test_shard_damaged_mid_run_is_one_line_from_a_loader_worker(clips, tmp_path):
    """A shard truncated after the index was loaded: the DataLoader worker's ShardError
    reaches the main process as a ShardError with the original one-line message."""
    from torch.utils.data import DataLoader

    out, index = _copy(clips[3], tmp_path)
    dc = data_config("tiny", modalities="video")
    stream = ShardStream(ShardClips(out, None, dc, class_index=NAMES), 0, 1, 1, shuffle=False)
    path = index.shard_path(0)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ShardError) as e:
        list(DataLoader(stream, batch_size=1, num_workers=1, collate_fn=lambda b: b))
    assert str(e.value).startswith(f"shard {path} holds 5000 bytes") and "\n" not in str(e.value)
