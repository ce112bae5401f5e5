"""WebDataset-style shards: packing, decoding from memory, streaming order, resume.

Real encoded clips (synthetic mp4s, a FLAC sidecar, a corrupt file, a missing
row); the folder path (:class:`AVClipDataset`, :class:`SeededDataset`) is the
reference for what a sample decodes to.
"""

import csv
import json
import tarfile

import numpy as np
import pytest
import soundfile
import torch
from config_helpers import as_overrides
from test_train_resume import DEMO, _assert_same
from torch.utils.data import DataLoader

from mmt_fast.data import AVClipDataset, collate_clips, data_config, read_manifest
from mmt_fast.data.shards import ShardClips, ShardIndex, ShardStream, iter_tar, write_shards
from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.errors import ConfigError, DataError
from mmt_fast.run import load_checkpoint, load_config
from mmt_fast.run.checkpoint import CheckpointManager
from mmt_fast.run.sampling import SeededDataset
from mmt_fast.train import train


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """16 train clips (one with a FLAC sidecar), a corrupt file and a missing row, in 9 shards."""
    root = tmp_path_factory.mktemp("shards")
    m = make_synthetic(root / "syn", num_clips=16, size=32, duration=1.0, val_frac=0, test_frac=0)
    rows = list(csv.DictReader(open(m)))
    # a 16 kHz mono FLAC sidecar replaces clip 1's own audio track (a 440 Hz tone)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    soundfile.write(root / "syn" / "clip_00001.flac", tone.astype(np.float32), 16000)
    (root / "syn" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 500)
    rows.append({**rows[0], "path": "broken.mp4"})
    rows.append({**rows[0], "path": "gone.mp4"})
    with open(root / "syn" / "all.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    index = write_shards(root / "syn" / "all.csv", root / "out", max_shard_bytes=40_000)
    return root / "syn" / "all.csv", index


def test_layout_and_index(packed):
    manifest, index_path = packed
    ix = ShardIndex.load(index_path.parent)  # the folder works as well as the file
    assert len(ix.samples) == 17 and len(ix.shards) >= 8
    assert [m["path"].endswith("gone.mp4") for m in ix.missing] == [True]
    assert ix.missing[0]["reason"] == "file does not exist"
    assert sum(s["num_samples"] for s in ix.shards) == 17
    # plain tar members named <key>.<ext>, one sample's members consecutive
    sh = ix.shard_path(ix.samples[1]["shard"])
    with tarfile.open(sh) as tar:
        names = tar.getnames()
    assert f"{ix.samples[1]['key']}.flac" in names and f"{ix.samples[1]['key']}.mp4" in names
    # the sequential reader and the by-offset reader return the same bytes
    recs = read_manifest(manifest)
    for i in range(3):
        s = ix.samples[i]
        with open(ix.shard_path(s["shard"]), "rb") as f:
            seq = dict(iter_tar(f))[s["key"]]
        assert seq == ix.read_sample(i)
        assert seq["mp4"] == open(recs[i].path, "rb").read()
        assert json.loads(seq["json"])["label"] == recs[i].label


def _write_rows(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_segments_sharing_a_file_are_refused(packed, tmp_path):
    manifest, _ = packed
    rows = list(csv.DictReader(open(manifest)))[:2]
    rows[1]["path"] = rows[0]["path"]  # two segments of one file
    rows = [{**r, "start_s": t0, "end_s": t1} for r, (t0, t1) in zip(rows, [(0, 0.5), (0.5, 1)])]
    with pytest.raises(DataError, match="1 files serve several segments"):
        write_shards(_write_rows(tmp_path / "m.csv", rows), tmp_path / "out",
                     root=manifest.parent, progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()  # refused before any work


def test_rows_of_one_clip_are_packed_each(packed, tmp_path):
    """Rows of the same file and times with other targets (prepare's manifest when records
    share a cut) are packed, each with its own copy and its own metadata."""
    manifest, _ = packed
    rows = list(csv.DictReader(open(manifest)))[:2]
    rows[1] = {**rows[1], "path": rows[0]["path"], "label": "other"}
    ix = ShardIndex.load(write_shards(_write_rows(tmp_path / "m.csv", rows), tmp_path / "out",
                                      root=manifest.parent, progress=False))  # fmt: skip
    a, b = ix.read_sample(0), ix.read_sample(1)
    assert a["mp4"] == b["mp4"] == (manifest.parent / rows[0]["path"]).read_bytes()
    assert [json.loads(x["json"])["label"] for x in (a, b)] == [rows[0]["label"], "other"]


def test_bad_index_is_refused(tmp_path):
    (tmp_path / "index.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not an mmt-fast-shards index"):
        ShardIndex.load(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        ShardIndex.load(tmp_path / "nope")


@pytest.mark.parametrize("modalities", ["av", "audio"])
def test_test_mode_items_equal_the_folder(packed, modalities):
    """Decoding from memory gives exactly the folder's inputs (views, sidecar included)."""
    manifest, index_path = packed
    dc = data_config("tiny", mode="test", num_views=2, modalities=modalities, on_error="skip")
    folder = AVClipDataset(read_manifest(manifest), dc)
    shards = ShardClips(index_path, None, dc, class_index=folder.class_index)
    assert len(shards) == len(folder) - 1  # the missing row is not in the shards ...
    assert shards.skip_counts["missing_file"] == 1  # ... but counted, as the folder counts it
    assert shards.dropped[0].kind == "missing_file"
    n_bad = 0
    for i in range(len(shards)):
        a, b = folder[i], shards[i]
        if not isinstance(a, dict):  # the corrupt file: the same kind of bad clip
            assert (a.kind, b.kind) == ("corrupt_file", "corrupt_file")
            n_bad += 1
            continue
        for k in ("audio", "video", "label", "index"):
            if k in a:
                assert torch.equal(a[k], b[k]), (i, k)
    assert n_bad == 1
    if modalities == "audio":  # clip 1's audio is its FLAC sidecar, read from memory
        r = read_manifest(manifest)[1]
        flac = r.__class__(r.path.replace(".mp4", ".flac"), r.clip_id, label=r.label)
        ref = AVClipDataset([flac], dc, class_index=folder.class_index)[0]["audio"]
        assert torch.equal(ref, shards[1]["audio"])
        assert not torch.equal(ref, shards[0]["audio"])


def _stream(packed, workers, world=1, rank=0, buffer=3, bs=2, **dc_kw):
    _, index_path = packed
    dc = data_config("tiny", mode="train", on_error="skip", **dc_kw)
    clips = ShardClips(index_path, None, dc)
    return ShardStream(clips, 11, bs, workers, world, rank, shuffle_buffer=buffer)


def _delivered(stream, workers):
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers,
                        collate_fn=lambda b: b)  # fmt: skip
    out = []
    for batch in loader:
        out += [int(x["index"]) if isinstance(x, dict) else x.index for x in batch]
    return out


def test_train_items_equal_seeded_folder_items(packed):
    """A streamed training clip is the map-style path's clip with the same (seed, epoch)."""
    manifest, _ = packed
    st = _stream(packed, 0)
    st.set_epoch(3)
    folder = SeededDataset(AVClipDataset(read_manifest(manifest), st.clips.config), 11)
    folder.epoch = 3
    items = [x for x in st if isinstance(x, dict)]
    assert len(items) >= 10
    for x in items:
        y = folder[int(x["index"])]
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["audio"], y["audio"])


def test_stream_splits_ranks_and_workers(packed):
    """Ranks x workers read disjoint shards; every rank gets the same number of whole
    batches; the delivered order is the planned one; epochs differ, replays do not."""
    plans = []
    for rank in range(2):
        st = _stream(packed, 2, world=2, rank=rank, modalities="audio")
        st.set_epoch(1)
        plan = st.epoch_indices()
        assert len(plan) == st.samples_per_rank == 8  # 16 usable / 4 slots = 4 per worker
        assert _delivered(st, 2) == plan  # real worker processes, real shard reads
        shards = [set(st._slot_shards(rank * 2 + w)) for w in range(2)]
        assert not shards[0] & shards[1]
        plans.append((plan, shards))
    assert not (plans[0][1][0] | plans[0][1][1]) & (plans[1][1][0] | plans[1][1][1])
    slots = {}
    for epoch in (1, 2):
        st.set_epoch(epoch)
        slots[epoch] = [st._slot_shards(s) for s in range(4)]
        # every shard is read once per epoch, by one of the 4 streams
        assert sorted(x for sl in slots[epoch] for x in sl) == list(range(len(st.shard_items)))
    assert slots[2] != slots[1]  # a new permutation of the shards ...
    assert st.epoch_indices() != plans[1][0]  # ... and a new order for this rank
    st.set_epoch(1)
    assert st.epoch_indices() == plans[1][0]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_skip_replays_the_rest(packed, workers):
    """After k batches, a restarted loader delivers exactly the epoch's remaining items."""
    st = _stream(packed, workers, modalities="audio")
    st.set_epoch(4)
    plan = st.epoch_indices()
    assert len(plan) == 16 // max(workers, 1) // 2 * 2 * max(workers, 1)
    for k in (1, 3):
        st.set_epoch(4, skip=k * 2)
        assert _delivered(st, workers) == plan[k * 2 :]


def test_bad_clips_are_counted_per_kind(packed):
    st = _stream(packed, 0, bs=1, modalities="audio")
    batch = collate_clips(list(st))
    # 17 records in the shards (16 clips + the corrupt file); the missing row is not
    assert batch["skipped"] == {"corrupt_file": 1} and batch["batch_size"] == 16
    bad, ix = batch["bad"][0], st.clips.index
    sample = next(s for s in ix.samples if s["meta"]["path"].endswith("broken.mp4"))
    assert bad.path == f"{ix.shard_path(sample['shard'])}:{sample['key']}"  # the shard named
    assert bad.reason.endswith(f"(packed from {sample['meta']['path']})")


def test_too_few_shards_is_refused(packed):
    with pytest.raises(DataError, match="shards cannot feed"):
        _stream(packed, 4, world=4)


def _overrides(index, out, **extra):
    o = {
        "data.format": "webdataset",
        "data.train": str(index),
        "data.val": str(index),
        "data.val_split": "train",
        "data.test": str(index),
        "data.num_workers": 0,
        "data.cache": False,
        "data.shuffle_buffer": 4,
        "data.on_error": "skip",
        "train.out_dir": str(out),
        "train.batch_size": 2,
        "train.grad_accum": 2,  # 8 micro-batches = 4 steps per epoch
        "train.epochs": 2,
        "train.ckpt_every": 3,
        "train.eval_every": 2,
        "train.deterministic": True,
        "train.torch_threads": 1,
        "train.progress": False,
        "train.tensorboard": False,
        "schedule.warmup_steps": 2,
    }
    o.update(extra)
    return as_overrides(o)


def test_shard_training_resumes_exactly(packed, tmp_path):
    """One process, transforms on the device (the DDP test below uses the CPU ones)."""
    _, index = packed

    def _train_overrides(index, out, **extra):
        return _overrides(index, out, **{"data.device_transforms": True, **extra})

    ref = train(load_config(DEMO, _train_overrides(index, tmp_path / "ref")))
    # the bad-clip report: the missing row always, the corrupt clip when an epoch drew it
    st = _stream(packed, 0)
    st.seed = 0  # the run's train.seed
    drawn = set()
    for epoch in (0, 1):
        st.set_epoch(epoch)
        drawn |= set(st.epoch_indices())
    broken = [i for i, r in enumerate(st.clips.records) if r.path.endswith("broken.mp4")]
    expected = {"missing_file": 1} | ({"corrupt_file": 1} if broken[0] in drawn else {})
    assert ref["step"] == 8 and ref["skipped_clips"] == expected
    out = tmp_path / "run"
    res = train(load_config(DEMO, _train_overrides(index, out, **{"train.stop_at_step": 7})))
    assert res["interrupted"] and CheckpointManager(out / "checkpoints").steps()[-1] == 6
    # mid-epoch, the worker count is part of the stream's order: a different one is refused
    with pytest.raises(ConfigError, match="same count"):
        train(load_config(DEMO, _train_overrides(index, out, **{"data.num_workers": 2})), True)
    # num_workers 0 and 1 are the same single stream: resume in a worker process
    res2 = train(
        load_config(DEMO, _train_overrides(index, out, **{"data.num_workers": 1})), resume=True
    )
    assert res2["step"] == 8 and res2["skipped_clips"] == ref["skipped_clips"]
    _assert_same(load_checkpoint(tmp_path / "ref", which="latest").model,
                 load_checkpoint(out, which="latest").model)  # fmt: skip


@pytest.mark.distributed
def test_shard_training_ddp_resumes_exactly(packed, tmp_path):
    """``torchrun --nproc_per_node=2`` (gloo): the ranks stream disjoint shards; a run
    stopped mid-epoch and resumed ends with the uninterrupted run's weights on both ranks."""
    from test_train_ddp import _torchrun

    _, index = packed
    runs = {}
    for name, stop in (("ref", None), ("run", 3)):
        out = tmp_path / name
        extra = {"data.num_workers": 1, "train.ckpt_every": 1, "train.eval_every": 0}
        cfg = load_config(DEMO, _overrides(index, out, **extra))
        cfg_path = tmp_path / f"{name}.yaml"
        cfg_path.write_text(cfg.to_yaml())
        stop_arg = [f"train.stop_at_step={stop}"] if stop else []
        _torchrun(tmp_path, cfg_path, "first", *stop_arg)
        runs[name] = [json.loads((out / f"rank{i}_first.json").read_text()) for i in range(2)]
        if stop:
            assert [r["step"] for r in runs[name]] == [3, 3]
            _torchrun(tmp_path, cfg_path, "resume")
            runs[name] = [json.loads((out / f"rank{i}_resume.json").read_text()) for i in range(2)]
    ref, res = runs["ref"], runs["run"]
    # 17 clips / 2 ranks -> 8 per rank = 4 micro-batches of 2 = 2 steps per epoch, 2 epochs
    assert [r["step"] for r in ref + res] == [4, 4, 4, 4]
    assert not set(ref[0]["sampler"]) & set(ref[1]["sampler"])  # disjoint shards per rank
    assert ref[0]["hash"] == ref[1]["hash"] == res[0]["hash"] == res[1]["hash"]


def test_records_choose_the_samples(packed):
    """ShardClips(records=...) serves those records' samples in their order (as
    builders.build_split_dataset passes them); a record not in the split is an error."""
    _, index_path = packed
    ix = ShardIndex.load(index_path)
    dc = data_config("tiny", mode="test", modalities="audio", on_error="skip")
    recs = [ix.record(5), ix.record(2)]
    clips = ShardClips(ix, None, dc, recs)
    assert clips.sample_of == [5, 2] and [r.clip_id for r in clips.records] == [
        ix.samples[5]["meta"]["clip_id"], ix.samples[2]["meta"]["clip_id"]]  # fmt: skip
    whole = ShardClips(ix, None, dc)
    assert torch.equal(clips[0]["audio"], whole[5]["audio"])
    with pytest.raises(DataError, match="is not a sample of split"):
        ShardClips(ix, "val", dc, recs)


def test_check_shards_counts_like_the_folder(packed):
    """check_shards over the shards: the corrupt clip named by its shard and key, the row
    missing at packing time counted, 16 + 1 + 1 clips in all (what check_clips reports for
    the manifest's files, named by their paths)."""
    from mmt_fast.data.check import check_clips, check_shards

    manifest, index_path = packed
    dc = data_config("tiny", modalities="audio")
    n, probs = check_shards(index_path, None, dc, workers=0, progress=False)
    ref = check_clips(read_manifest(manifest), dc, workers=0, progress=False)
    assert n == 18 and sorted(p.kind for p in probs) == sorted(p.kind for p in ref)
    ix = ShardIndex.load(index_path)
    (bad,) = [p for p in probs if p.kind == "corrupt_file"]
    s = next(s for s in ix.samples if s["meta"]["path"].endswith("broken.mp4"))
    assert bad.path == f"{ix.shard_path(s['shard'])}:{s['key']}"
