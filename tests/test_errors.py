"""One error hierarchy (mmt_fast/errors.py) and one mapping to exit codes (mmt_fast.cli):
the data errors derive from it, the converters raise its CheckpointError, the CLI
recognises classes by inheritance (never by name), and a command's failure is one
line on stderr."""

from pathlib import Path

import pytest
import yaml

from mmt_fast import errors
from mmt_fast.cli import error_exit_code, main
from mmt_fast.data import BadClipError

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"


def test_one_hierarchy():
    from mmt_fast import pretrained

    assert issubclass(BadClipError, errors.DataError)
    assert pretrained.CheckpointError is errors.CheckpointError
    # code that caught the builtin types keeps working
    for cls, builtin in (
        (errors.ConfigError, ValueError),
        (errors.DataError, ValueError),
        (errors.TrainingError, RuntimeError),
        (errors.CheckpointError, RuntimeError),
        (errors.CheckpointError, ValueError),  # what pretrained raised before
    ):
        assert issubclass(cls, errors.MMTError) and issubclass(cls, builtin), cls


def test_exit_codes_by_class_not_by_name():
    bad = BadClipError("/a.mp4", "broken", "corrupt_file")
    assert error_exit_code(bad) == (3, "data")

    class Renamed(BadClipError):
        pass

    assert error_exit_code(Renamed("/a.mp4", "broken", "corrupt_file")) == (3, "data")
    impostor = type("BadClipError", (Exception,), {})("not one of ours")
    assert error_exit_code(impostor) == (4, "runtime")
    assert error_exit_code(errors.ConfigError("x")) == (2, "config")
    assert error_exit_code(errors.CheckpointError("x")) == (4, "runtime")
    assert error_exit_code(KeyboardInterrupt()) == (130, "interrupted")
    assert error_exit_code(ZeroDivisionError()) == (4, "runtime")


def test_config_checks_raise_config_errors():
    from mmt_fast.run.config import config_from_dict, parse_overrides

    with pytest.raises(errors.ConfigError, match=r"model\.init\.audio and model\.init\.ast"):
        config_from_dict({"model": {"init": {"audio": "a.pth", "ast": "b.pth"}}})
    with pytest.raises(errors.ConfigError, match="is not KEY=VALUE"):
        parse_overrides(["train.epochs"])


def test_run_config_overrides_are_config_errors(tmp_path):
    """Overrides of a run's saved config (``mmt-fast evaluate RUN KEY=VALUE``): an unknown
    key or a wrong type is a ConfigError naming it (before: a KeyError, exit code 4)."""
    from mmt_fast.inference import run_config
    from mmt_fast.run.checkpoint import Checkpoint
    from mmt_fast.run.config import load_config

    saved = yaml.safe_dump(load_config(DEMO).to_dict())
    ck = Checkpoint(path=tmp_path, model={}, config=saved)
    assert run_config(None, ck, ["data.test_views=2"]).data.test_views == 2
    with pytest.raises(errors.ConfigError, match="unknown key"):
        run_config(None, ck, ["data.no_such_key=1"])
    with pytest.raises(errors.ConfigError, match="expected an int"):
        run_config(None, ck, ["train.epochs=abc"])


def test_command_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    out = tmp_path / "x.safetensors"
    argv = ["convert", "--from", "timm-mvitv2", "--checkpoint", str(missing), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmt-fast: config error: "), err
    assert f"checkpoint '{missing}' does not exist" in err[0]
    assert (
        main([*argv[:-4], "--checkpoint", str(missing), "--out", str(out), "--model", "MMT"]) == 2
    )
    assert "name an encoder preset" in capsys.readouterr().err
    assert main(["plan", "--model", "MAT-tiny", "--gpu-mem", "forty"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config error: cannot read a memory size from 'forty'" in err[0]
