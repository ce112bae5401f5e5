"""``mmt-fast`` end to end on generated data: make-synthetic, train (with a bad
clip that is skipped and reported), evaluate (JSON + confusion plot), and the
Epic-Kitchens-style two-head model (verb, noun, action)."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mmt_fast.cli import main

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"
FAST = [
    "data.num_workers=0",
    "train.torch_threads=1",
    "train.progress=false",
    "train.epochs=1",
    "train.batch_size=4",
    "train.ckpt_every=2",
    "data.test_views=2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    assert (
        main(
            [
                "make-synthetic",
                "--out",
                str(d),
                "--num-clips",
                "24",
                "--size",
                "32",
                "--duration",
                "1.0",
            ]
        )
        == 0
    )
    return d


def test_console_script_is_installed():
    exe = shutil.which("mmt-fast")
    assert exe, "pip install -e . installs the mmt-fast console script"
    out = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--resume" in out.stdout


def test_train_then_evaluate(data_dir, tmp_path):
    manifest = data_dir / "manifest.csv"
    rows = list(csv.DictReader(open(manifest)))
    rows.append({**rows[0], "path": "does_not_exist.mp4"})  # one bad training clip
    bad_manifest = data_dir / "manifest_with_bad.csv"
    with open(bad_manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "run"
    ov = [
        f"data.train={bad_manifest}",
        f"data.val={manifest}",
        f"data.test={manifest}",
        f"train.out_dir={out}",
        *FAST,
    ]
    assert main(["train", "--config", str(DEMO), *ov]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["skipped_clips"] == {"missing_file": 1}
    assert "does_not_exist.mp4" in next(iter(summary["bad_clips"]))
    assert (out / "metrics.csv").read_text().count("train/total") >= 1
    assert list((out / "tb").iterdir()), "TensorBoard events written"
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    ck = out / "checkpoints" / f"step_{best['step']:09d}"
    assert json.loads((ck / "classes.json").read_text())["names"] == [
        "left-300Hz",
        "left-700Hz",
        "right-300Hz",
        "right-700Hz",
    ]
    # a second fresh run may not overwrite the first: a config error (exit code 2)
    assert main(["train", "--config", str(DEMO), *ov]) == 2
    res_file = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--config",
                str(DEMO),
                "--checkpoint",
                str(out),
                "--out",
                str(res_file),
                *ov,
            ]
        )
        == 0
    )
    res = json.loads(res_file.read_text())
    assert res["num_clips"] == 4 and res["views"] == 2 and res["split"] == "test"
    assert {"top1", "top5", "mean_class_accuracy", "heads"} <= set(res)
    assert len(res["heads"]["label"]["confusion_matrix"]) == 4
    assert (tmp_path / "eval_confusion_label.png").stat().st_size > 1000


def test_epic_kitchens_two_heads(data_dir, tmp_path):
    rows = list(csv.DictReader(open(data_dir / "manifest.csv")))
    ek = data_dir / "ek.csv"
    with open(ek, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "verb", "noun", "split"])
        for r in rows:  # verb = motion (3 classes), noun = pitch band (5 classes)
            w.writerow(
                [
                    r["path"],
                    ["right", "left", "down"].index(r["motion"]),
                    int(float(r["pitch_hz"]) > 500),
                    r["split"],
                ]
            )
    out = tmp_path / "ek"
    ov = [
        f"data.train={ek}",
        f"data.val={ek}",
        f"data.test={ek}",
        "model.preset=MMT-tiny-EK",
        f"train.out_dir={out}",
        *FAST,
    ]
    assert main(["train", "--config", str(DEMO), *ov]) == 0
    # the run's own config and class index by default; results beside metrics.csv
    assert main(["evaluate", "--checkpoint", str(out), "--no-plot"]) == 0
    res = json.loads((out / "eval_test.json").read_text())
    assert set(res["heads"]) == {"verb", "noun"}
    assert {"verb_top1", "noun_top1"} <= set(res) and set(res["action"]) == {"top1", "top5"}
    assert res["top1"] == res["action"]["top1"] <= min(res["verb_top1"], res["noun_top1"])
