"""Learning-rate schedule and YAML config mapping."""

import itertools
import math
from pathlib import Path

import pytest
import torch

from mmt_fast.run.config import TrainConfig, config_from_dict, load_config
from mmt_fast.train.schedule import WarmupCosine, lr_factor

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.1),  # warmup starts at warmup_start_ratio
        (5, 0.1 + 0.9 * 5 / 10),
        (10, 1.0),  # peak after warmup
        (60, 0.01 + 0.99 * 0.5),  # cosine midpoint
        (110, 0.01),  # end
        (500, 0.01),  # past the end stays at the floor
    ],
)
def test_lr_factor_values(step, expected):
    f = lr_factor(step, total_steps=110, warmup_steps=10, min_lr_ratio=0.01, warmup_start_ratio=0.1)
    assert math.isclose(f, expected, rel_tol=1e-9, abs_tol=1e-12)


def test_warmup_cosine_sets_lr_and_round_trips_state():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    s = WarmupCosine(opt, total_steps=20, warmup_steps=4)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(7):
        opt.step()
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and math.isclose(lrs[4], 1e-3)
    rising, falling = lrs[:5], lrs[4:]
    assert all(a < b for a, b in itertools.pairwise(rising))
    assert all(a > b for a, b in itertools.pairwise(falling))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    s2 = WarmupCosine(opt2, total_steps=20, warmup_steps=4)
    s2.load_state_dict(s.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert all(isinstance(v, int | float | list) for v in s.state_dict().values())


def test_config_round_trip_and_overrides():
    cfg = config_from_dict(
        {
            "model": {"preset": "MMT-tiny", "overrides": {"audio__input_size": [32, 64]}},
            "optim": {"lr": "3e-4", "betas": [0.9, 0.95]},
        },
        ["train.epochs=3", "model.overrides.loss__align=null", "data.num_workers=0"],
    )
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.epochs == 3 and cfg.data.num_workers == 0
    assert cfg.model.overrides == {"audio__input_size": [32, 64], "loss__align": None}
    import yaml

    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    ("d", "err"),
    [
        ({"train": {"epocs": 3}}, KeyError),  # typo
        ({"nonsense": {}}, KeyError),
        ({"train": {"epochs": "three"}}, TypeError),
        ({"train": {"amp": "fp8"}}, ValueError),
        ({"data": {"format": "parquet"}}, ValueError),
    ],
)
def test_config_rejects_bad_values(d, err):
    with pytest.raises(err):
        config_from_dict(d)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_parse_and_build_their_model_config(path):
    from mmt_fast.run.builders import model_config

    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    n = 4 if "synthetic" in path.stem else 309
    classes = (
        None if "epic" in path.stem else {"kind": "label", "names": [str(i) for i in range(n)]}
    )
    mc = model_config(cfg, classes)
    assert mc.heads  # a valid MMT config
