"""`mmt-fast prepare` when the output side fails or a worker dies: a full disk, a read-only
output and a file where a folder should be stop it with the I/O exit code naming the
output path (never counted as bad sources); a worker killed mid-run ends it non-zero,
naming the clip it was preparing, instead of hanging."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_media import synthetic_clip

from mmt_fast.cli import main as cli_main
from mmt_fast.data.prepare import RUNNING_DIR
from mmt_fast.errors import StorageError

IO_EXIT = StorageError.exit_code


def _sources(folder: Path, n: int, duration: float = 2.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for k in range(n):
            synthetic_clip(folder / f"c{k}.mp4", motion=k % 2, seed=k, duration=duration)
            w.writerow([f"c{k}.mp4", f"l{k % 2}"])
    return folder / "m.csv"


def _prepare(man, out, *extra):
    return cli_main(["prepare", "--manifest", str(man), "--out", str(out), "--short-side", "32",
                     "--no-progress", *extra])  # fmt: skip


@pytest.fixture
def small_fs(tmp_path):
    """A 160 KiB tmpfs (root only, as in CI; skipped where mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_full_disk_is_an_io_error_naming_the_output(tmp_path, small_fs, capsys, workers):
    man = _sources(tmp_path / "src", 6)
    out = small_fs / "out"
    assert _prepare(man, out, "--workers", workers) == IO_EXIT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "I/O error: cannot write " + str(out) in line and "No space left" in line, line
    assert "corrupt_file" not in line and "decode_error" not in line
    assert not (out / "manifest.csv").exists()  # no manifest of what happened to fit


def test_read_only_output_is_an_io_error(tmp_path, small_fs, capsys):
    man = _sources(tmp_path / "src", 2)
    (small_fs / "out" / "clips").mkdir(parents=True)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    assert _prepare(man, small_fs / "out", "--workers", "1") == IO_EXIT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"I/O error: cannot write {small_fs / 'out'}" in line and "Read-only" in line, line


def test_file_where_a_folder_should_be(tmp_path, capsys):
    man = _sources(tmp_path / "src", 1, duration=1.0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "clips").write_text("not a folder")
    assert _prepare(man, out, "--workers", "1") == IO_EXIT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"I/O error: cannot write {out / 'clips'}" in line, line


def test_killed_worker_stops_prepare_naming_the_clip(tmp_path):
    """SIGKILL one of two workers (as the out-of-memory killer would) while it prepares a
    clip: prepare exits with a runtime error naming that clip (the subprocess timeout only
    guards against a hang)."""
    man = _sources(tmp_path / "src", 6, duration=4.0)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmt_fast.cli", "prepare", "--manifest", str(man), "--out",
           str(out), "--workers", "2", "--short-side", "32", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = None
    deadline = time.monotonic() + 120  # hang guard only
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        for marker in (out / RUNNING_DIR).glob("*"):
            try:
                src, pid = marker.read_text().rsplit(" ", 1)
            except (OSError, ValueError):
                continue  # being written or just removed
            os.kill(int(pid), signal.SIGKILL)
            victim = src
            break
        time.sleep(0.005)
    assert victim is not None, "no worker was seen preparing a clip"
    _, err = proc.communicate(timeout=120)
    line = err.decode().strip().splitlines()[-1]
    assert proc.returncode == 4, err.decode()
    assert "prepare worker process died" in line and victim in line, line
    assert line.count("(pid ") <= 2, line  # the dead worker's and the other one's
    assert not (out / "manifest.csv").exists()


def _garble_audio(src: Path, dst: Path) -> Path:
    """``src`` remuxed with every audio packet replaced by random bytes of its size."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(src)) as i, av.open(str(dst), "w", format="mp4") as o:
        vi, ai = i.streams.video[0], i.streams.audio[0]
        vo, ao = o.add_stream_from_template(vi), o.add_stream_from_template(ai)
        for p in i.demux(vi, ai):
            if p.dts is None:
                continue
            if p.stream is ai:
                q = av.Packet(rng.integers(0, 256, p.size, dtype=np.uint8).tobytes())
                q.pts, q.dts, q.time_base, q.duration = p.pts, p.dts, p.time_base, p.duration
                q.stream = ao
                o.mux(q)
            else:
                p.stream = vo
                o.mux(p)
    return dst


def test_unreadable_audio_keeps_the_clip_for_video(tmp_path):
    """A source whose audio track cannot be decoded (its packets garbled): kept without
    audio, the reason in the report; video-only training loads it, audio training counts
    it no_audio."""
    from mmt_fast.data import AVClipDataset, data_config, read_manifest

    man = _sources(tmp_path / "src", 2, duration=1.0)
    c1 = tmp_path / "src" / "c1.mp4"
    _garble_audio(c1, tmp_path / "garbled.mp4").replace(c1)
    out = tmp_path / "out"
    assert _prepare(man, out, "--workers", "1") == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["unusable_counts"] == {} and report["records_written"] == 2
    (kept,) = report["warnings"]["no_audio"]
    assert kept["path"].endswith("c1.mp4") and "cannot decode audio" in kept["reason"]
    recs = read_manifest(out / "manifest.csv")
    video = AVClipDataset(recs, data_config("tiny", mode="test", modalities="video"))
    assert all(isinstance(video[i], dict) for i in range(2))
    av = AVClipDataset(recs, data_config("tiny", mode="test", on_error="skip"))
    assert isinstance(av[0], dict) and av[1].kind == "no_audio"
