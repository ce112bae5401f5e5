"""``mmt-fast predict`` and ``mmt-fast evaluate --checkpoint RUN`` on a run trained on
generated clips: predict gives, clip for clip, the predictions whose accuracy and
confusion matrix evaluate reports; bad files are skipped and reported per kind;
the embeddings are the classification head's input. Also the terminal output of
``train`` (validation lines above the progress bar, 1-based epochs, ``--resume``
with nothing to resume) and ``--help`` without importing torch."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmt_fast.cli import main

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "configs" / "demo_synthetic.yaml"
FAST = [
    "data.num_workers=0",
    "train.torch_threads=1",
    "train.epochs=2",
    "train.eval_every=1",
    "train.batch_size=4",
    "train.ckpt_every=null",
    "train.tensorboard=false",
    "data.test_views=2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    args = ["--out", str(d), "--num-clips", "40", "--size", "32", "--duration", "1.0"]
    assert main(["make-synthetic", *args]) == 0
    return d


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """The demo run, trained by the console command with the progress bar on
    (and ``--resume`` in a fresh folder); returns (run dir, its stderr)."""
    out = tmp_path_factory.mktemp("run") / "demo"
    m = data_dir / "manifest.csv"
    ov = [f"data.{s}={m}" for s in ("train", "val", "test")]
    cmd = [sys.executable, "-m", "mmt_fast.cli", "train", "--config", str(DEMO), "--resume"]
    cmd += [f"train.out_dir={out}", *ov, *FAST, "train.progress=true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return out, r.stderr


@pytest.fixture(scope="module")
def evaluation(run):
    """``mmt-fast evaluate --checkpoint RUN`` (nothing else): the report it writes."""
    out, _ = run
    assert main(["evaluate", "--checkpoint", str(out)]) == 0
    return json.loads((out / "eval_test.json").read_text())  # beside metrics.csv


def _test_clips(data_dir: Path) -> list[dict]:
    rows = list(csv.DictReader(open(data_dir / "manifest.csv")))
    return [r for r in rows if r["split"] == "test"]


def test_train_terminal_lines(run):
    out, err = run
    assert "--resume: no checkpoint in" in err and "starts from step 0" in err
    vals = [i for i in range(len(err)) if err.startswith("[mmt-fast] epoch", i)]
    assert len(vals) == 2, err
    # tqdm.write clears the bar's line first: the message never follows bar text
    assert all(err[i - 1] in "\r\n" for i in vals), err
    assert "[mmt-fast] epoch 1/2: val" in err and "[mmt-fast] epoch 2/2: val" in err
    assert "(after epoch 2/2)" in err
    epochs = {r["epoch"] for r in csv.DictReader(open(out / "metrics.csv"))}
    assert epochs == {"1", "2"}


def test_evaluate_defaults_to_the_runs_config(run, evaluation, capsys):
    out, _ = run
    res = evaluation
    assert res["views"] == 2 and res["num_clips"] == 8
    assert res["class_names"] == ["left-300Hz", "left-700Hz", "right-300Hz", "right-700Hz"]
    assert (out / "eval_test_confusion_label.png").stat().st_size > 1000
    # a config describing another model is refused in one sentence: a config error (exit 2)
    capsys.readouterr()
    args = ["--checkpoint", str(out), "--config", str(DEMO), "model.preset=MMT-tiny-audio"]
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and len(err[0]) < 500, err
    assert re.search(r"config error: .*MMT-tiny-audio.*leave out --config", err[0]), err


def test_predict_matches_evaluate(run, evaluation, data_dir, tmp_path, capsys):
    out, _ = run
    res = evaluation
    names = res["class_names"]
    test = _test_clips(data_dir)
    # a list file (relative paths) and a folder holding the same clips
    lst = tmp_path / "clips.txt"
    lst.write_text("# test clips\n" + "".join(f"{data_dir / r['path']}\n" for r in test))
    folder = tmp_path / "folder"
    folder.mkdir()
    for r in test:
        (folder / r["path"]).symlink_to(data_dir / r["path"])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), str(lst), "--top-k", "3"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--checkpoint", str(out), str(folder), "--out", str(preds)]) == 0
    from_folder = [json.loads(x) for x in preds.read_text().splitlines()]

    assert [Path(r["path"]).name for r in rows] == [r["path"] for r in test]
    assert [Path(r["path"]).name for r in from_folder] == [r["path"] for r in test]
    assert [r["label"] for r in rows] == [r["label"] for r in from_folder]
    for r in rows:  # top-k: distinct class names, probabilities descending
        ks = [r["label"], r["label_2"], r["label_3"]]
        ps = [float(r["label_prob"]), float(r["label_prob_2"]), float(r["label_prob_3"])]
        assert len(set(ks)) == 3 and set(ks) <= set(names) and ps == sorted(ps, reverse=True)
    cm = np.zeros((4, 4), dtype=int)
    for r, t in zip(rows, test):
        cm[names.index(t["label"]), names.index(r["label"])] += 1
    assert cm.tolist() == res["heads"]["label"]["confusion_matrix"]
    right = sum(r["label"] == t["label"] for r, t in zip(rows, test))
    assert 100.0 * right / len(test) == pytest.approx(res["top1"])


def test_predict_bad_files_and_embeddings(run, evaluation, data_dir, tmp_path, capfd):
    out, _ = run
    good = data_dir / _test_clips(data_dir)[0]["path"]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(good.read_bytes()[:300])
    silent = tmp_path / "silent.mp4"
    from mmt_fast.data.synthetic import write_clip

    write_clip(silent, np.zeros((16, 32, 32, 3), np.uint8), 16, audio=None)
    emb = tmp_path / "emb.npy"
    inputs = [str(good), str(tmp_path / "missing.mp4"), str(corrupt), str(silent)]
    args = ["predict", "--checkpoint", str(out), *inputs, "--views", "1"]
    assert main([*args, "--embeddings", str(emb), "--out", str(tmp_path / "p.csv")]) == 0
    err = capfd.readouterr().err
    assert "skipped 3 bad files" in err
    for kind in ("missing_file", "corrupt_file", "no_audio"):
        assert kind in err
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["path"] for r in rows] == [str(good)]
    # the embeddings are the head's input: the head applied to them gives the probabilities
    from mmt_fast.inference import load_run

    e = torch.from_numpy(np.load(emb))
    fc = load_run(out).model.head.fc["label"]
    assert e.shape == (1, fc.in_features) and e.dtype == torch.float32
    with torch.no_grad():
        p = torch.softmax(fc(e), -1)[0]
    names = evaluation["class_names"]
    assert names[int(p.argmax())] == rows[0]["label"]
    assert float(p.max()) == pytest.approx(float(rows[0]["label_prob"]), abs=1e-5)


def test_predict_rejects_bad_arguments(run, tmp_path, capsys):
    out, _ = run
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), str(empty)]) == 2  # a config error
    assert "no media files" in capsys.readouterr().err
    # through the CLI's one mapping: a config error (exit 2) in one line
    assert main(["predict", "--checkpoint", str(out), str(empty), "--out", "x.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(
        r"config error: --out x\.txt: use a \.csv or \.jsonl", err[0]
    )


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from mmt_fast.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported for --help'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "predict" in r.stdout and "``" not in r.stdout
