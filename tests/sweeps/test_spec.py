"""Sweep-file validation and expansion: no Ray, milliseconds per case."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from revmix.sweeps.plan import describe_plan, expand, points
from revmix.sweeps.spec import Distribution, SweepError, load_sweep, parse_distribution, parse_sweep
from tests.sweeps.helpers import BASE_RAW, ROOT, sweep_raw, write_sweep


def parse(**changes):
    return parse_sweep(sweep_raw(**changes), "s.yaml", base_raw=BASE_RAW)


def test_valid_sweep_parses_with_defaults():
    spec = parse()
    assert spec.name == "s" and spec.search.name == "grid" and spec.scheduler.name == "fifo"
    assert spec.tracking.enabled == ["tensorboard"] and spec.eval
    assert spec.space["stages.0.mix.reverse_fraction"] == Distribution("grid", (0.0, 0.5, 1.0))
    assert spec.num_points() == 3 and spec.num_trials() == 6


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # unknown paths name the path and suggest close matches, exactly like `revmix train`
        (
            {"space": {"stages.0.mix.reverse_fracton": {"grid": [0.0, 1.0]}}},
            "space: stages.0.mix.reverse_fracton: unknown key 'reverse_fracton' at stages.0.mix "
            "(did you mean 'reverse_fraction'?)",
        ),
        ({"space": {"stage.0.lr": {"grid": [0.1]}}}, "did you mean 'stages'"),
        ({"space": {"stages.3.lr": {"grid": [0.1]}}}, "index 3 out of range; stages has 1 item(s)"),
        ({"overrides": {"modle.scale": "small"}}, "overrides (on base"),
        # values the typed config rejects: every grid value is checked, not just the first
        (
            {"space": {"stages.0.mix.reverse_fraction": {"grid": [0.0, 1.5]}}},
            "space: stages.0.mix.reverse_fraction: expected a number in [0, 1], got 1.5",
        ),
        ({"space": {"model.scale": {"grid": ["tiny", "huge"]}}}, "'huge' is not one of tiny, small, base"),
        (
            {
                "search": {"name": "random", "num_samples": 2},
                "space": {"stages.0.lr": {"uniform": [0.1, "x"]}},
            },
            "expected [low, high] (two numbers)",
        ),
        ({"space": {"stages.0.objective.name": {"grid": ["sft", "dpoo"]}}}, "stages.0.objective.name"),
        # unknown keys at every level
        (
            {"spcae": {}},
            "spcae: unknown key 'spcae' at the top level (did you mean 'space'?); valid keys: name,",
        ),
        ({"search": {"name": "optuna", "num_samples": 2, "sed": 1}}, "search.sed: unknown key"),
        (
            {"scheduler": {"name": "asha", "grace": 1}},
            "scheduler.grace: unknown key 'grace' for scheduler 'asha'; valid keys: grace_period,",
        ),
        ({"tracking": {"tensorbord": True}}, "did you mean 'tensorboard'"),
        ({"resources": {"CPUs": 1}}, "resources.CPUs: unknown key"),
        ({"search": "bayes"}, "search.name: 'bayes' is not one of grid, random, optuna"),
        ({"mode": "maximize"}, "mode: 'maximize' is not one of min, max"),
        ({"metric": None}, "metric: required key missing"),
        ({"seeds": [0, 0]}, "seeds: duplicate seeds"),
        ({"seeds": []}, "seeds: expected a non-empty list of integers"),
        ({"space": {"seed": {"grid": [0, 1]}}}, "space.seed: seeds are not a search dimension"),
        (
            {"overrides": {"stages.0.lr": 0.1}, "space": {"stages.0.lr": {"grid": [0.1, 0.2]}}},
            "also fixed in overrides",
        ),
        ({"max_concurrent_trials": 0}, "max_concurrent_trials: expected an integer >= 1"),
        ({"resources": {"cpu": 0}}, "resources.cpu: expected a number > 0"),
    ],
)
def test_invalid_sweeps_fail_naming_the_key(changes, message):
    with pytest.raises(SweepError) as err:
        parse(**changes)
    assert message in str(err.value)
    assert str(err.value).startswith("s.yaml: ")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"grid": []}, "grid: expected a non-empty list"),
        ({"grid": [1, 1]}, "duplicate value(s) 1"),
        ({"uniform": [1.0]}, "expected [low, high]"),
        ({"uniform": [1.0, 2.0, 3.0]}, "expected [low, high]"),
        ({"uniform": [2.0, 1.0]}, "low 2 must be < high 1"),
        ({"uniform": [1.0, 1.0]}, "low 1 must be < high 1"),
        ({"loguniform": [0.0, 1.0]}, "loguniform: bounds must be > 0"),
        ({"loguniform": [-1.0, 1.0]}, "loguniform: bounds must be > 0"),
        ({"randint": [1.5, 3]}, "randint: expected two integers"),
        ({"randint": [5, 2]}, "randint: low 5 > high 2"),
        ({"normal": [0, 1]}, "unknown distribution 'normal'"),
        ({"grid": [1], "choice": [2]}, "exactly one of"),
        ([0.1, 0.2], "exactly one of"),
    ],
)
def test_malformed_distributions(value, message):
    with pytest.raises(SweepError) as err:
        parse_distribution("stages.0.lr", value, "f.yaml")
    assert message in str(err.value) and "f.yaml: space.stages.0.lr" in str(err.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"search": {"name": "optuna", "num_samples": 4}},
            "space.stages.0.mix.reverse_fraction: optuna cannot run a grid",
        ),
        ({"space": {"stages.0.lr": {"uniform": [0.001, 0.01]}}}, "uniform needs search random or optuna"),
        ({"search": {"name": "optuna"}}, "search.num_samples: required key missing for search 'optuna'"),
        (
            {
                "search": {"name": "optuna", "num_samples": 2},
                "space": {"stages.0.objective": {"choice": [{"name": "sft"}, {"name": "dpo"}]}},
            },
            "optuna needs scalar choices",
        ),
        ({"scheduler": "asha"}, "asha stops trials on a metric reported every step"),
        ({"metric": "eval/accuracy/gsm8k"}, "benchmark not evaluated; this sweep evaluates synthetic"),
        (
            {"metric": "eval/alp/sideways/margin"},
            "expected eval/alp/<forward|reverse>/<chosen|rejected|margin>",
        ),
        ({"metric": "eval/accuracy/synthetic/backward"}, "direction must be one of forward, reverse"),
        ({"eval": False}, "needs evaluation, but the sweep sets eval: false"),
        (
            {"scheduler": {"name": "asha", "grace_period": 5, "max_t": 2}, "metric": "loss"},
            "grace_period 5 > max_t 2",
        ),
    ],
)
def test_combination_rules(changes, message):
    with pytest.raises(SweepError) as err:
        parse(**changes)
    assert message in str(err.value)


def test_asha_on_a_step_metric_defaults_max_t_to_the_longest_trial():
    spec = parse(
        metric="loss",
        mode="min",
        scheduler={"name": "asha", "grace_period": 1},
        space={"stages.0.steps": {"grid": [3, 8]}},
    )
    assert spec.default_max_t() == 8
    epochs_base = {**BASE_RAW, "stages": [{"objective": {"name": "sft"}, "epochs": 1}]}
    with pytest.raises(SweepError, match="scheduler.max_t: required"):
        parse_sweep(sweep_raw(metric="loss", mode="min", scheduler="asha"), "s.yaml", base_raw=epochs_base)


def test_validation_is_fast():
    parse()  # warm imports (objective registry)
    t0 = time.perf_counter()
    for _ in range(5):
        with pytest.raises(SweepError):
            parse(space={"stages.0.mix.reverse_fracton": {"grid": [0.0]}})
    assert (time.perf_counter() - t0) / 5 < 0.5  # generous for a loaded box: milliseconds in practice


def test_grid_times_seeds_expansion():
    spec = parse(
        space={
            "stages.0.mix.reverse_fraction": {"grid": [0.0, 1.0]},
            "model.scale": {"grid": ["tiny", "small"]},
        },
        seeds=[3, 4, 5],
    )
    trials = expand(spec)
    assert len(trials) == 12 == spec.num_trials()
    combos = {(t.point["stages.0.mix.reverse_fraction"], t.point["model.scale"], t.seed) for t in trials}
    assert len(combos) == 12  # every point once per seed, no duplicates
    assert [t.seed for t in trials[:3]] == [3, 4, 5]  # seeds innermost
    assert [t.index for t in trials] == list(range(12))


def test_trial_config_sets_seed_but_not_data_seed():
    spec = parse(overrides={"data.seed": 7, "stages.0.lr": 0.01})
    cfg = spec.trial_config({"stages.0.mix.reverse_fraction": 1.0}, seed=5, name="t1")
    assert cfg.seed == 5 and cfg.data.seed == 7 and cfg.name == "t1"
    assert cfg.stages[0].mix.reverse_fraction == 1.0 and cfg.stages[0].lr == 0.01
    other = spec.trial_config({"stages.0.mix.reverse_fraction": 1.0}, seed=6)
    assert other.data.seed == cfg.data.seed  # every trial sees the same data split


def test_trial_config_accepts_numpy_scalars_from_tune():
    np = pytest.importorskip("numpy")
    spec = parse(space={"stages.0.steps": {"grid": [2, 3]}})
    cfg = spec.trial_config({"stages.0.steps": np.int64(3)}, seed=np.int64(1))
    assert cfg.stages[0].steps == 3 and type(cfg.stages[0].steps) is int


def test_random_search_is_seeded_and_shares_draws_across_the_grid():
    raw = dict(
        search={"name": "random", "num_samples": 3, "seed": 11},
        space={
            "stages.0.mix.reverse_fraction": {"grid": [0.0, 1.0]},
            "stages.0.lr": {"loguniform": [1e-4, 1e-2]},
            "stages.0.steps": {"randint": [2, 4]},
            "model.scale": {"choice": ["tiny", "small"]},
        },
    )
    a, b = points(parse(**raw)), points(parse(**raw))
    assert a == b and len(a) == 6
    for p in a:
        assert 1e-4 <= p["stages.0.lr"] <= 1e-2 and p["stages.0.steps"] in (2, 3, 4)
        assert p["model.scale"] in ("tiny", "small")
    # each draw is crossed with the whole grid: r=0 and r=1 share the sampled lr
    assert a[0]["stages.0.lr"] == a[1]["stages.0.lr"] and a[0]["stages.0.mix.reverse_fraction"] == 0.0
    assert len({p["stages.0.lr"] for p in a}) == 3
    c = points(parse(**{**raw, "search": {"name": "random", "num_samples": 3, "seed": 12}}))
    assert [p["stages.0.lr"] for p in c] != [p["stages.0.lr"] for p in a]


def test_randint_is_inclusive_in_tune_too():
    pytest.importorskip("ray")
    d = parse_distribution("stages.0.steps", {"randint": [2, 4]}, "f")
    dom = d.to_tune()
    assert (dom.lower, dom.upper) == (2, 5)  # Tune's upper bound is exclusive


def test_load_sweep_resolves_base_relative_to_file(tmp_path: Path):
    sub = tmp_path / "sweeps"
    sub.mkdir()
    path = write_sweep(tmp_path, sweep_raw())
    moved = sub / "s.yaml"
    moved.write_text(path.read_text().replace("base: base.yaml", "base: ../base.yaml"))
    spec = load_sweep(moved)
    assert spec.base == (tmp_path / "base.yaml").resolve() and spec.base_raw["name"] == "unit"
    (sub / "bad.yaml").write_text(path.read_text().replace("base: base.yaml", "base: nope.yaml"))
    with pytest.raises(SweepError, match="base: 'nope.yaml' not found"):
        load_sweep(sub / "bad.yaml")
    with pytest.raises(SweepError, match="no such sweep file"):
        load_sweep(sub / "missing.yaml")


def test_linked_paths_take_the_swept_value():
    base = {
        **BASE_RAW,
        "stages": [BASE_RAW["stages"][0], {"name": "dpo", "objective": {"name": "dpo"}, "steps": 2}],
    }
    raw = sweep_raw(
        space={
            "stages.0.mix.reverse_fraction": {"grid": [0.0, 1.0], "link": ["stages.1.mix.reverse_fraction"]}
        }
    )
    spec = parse_sweep(raw, "s.yaml", base_raw=base)
    cfg = spec.trial_config({"stages.0.mix.reverse_fraction": 1.0}, seed=0)
    assert cfg.stages[0].mix.reverse_fraction == cfg.stages[1].mix.reverse_fraction == 1.0
    assert spec.num_trials() == 4  # linked, not crossed
    assert "(also stages.1.mix.reverse_fraction)" in describe_plan(spec)
    bad = {"grid": [0.0], "link": ["stages.1.mix.reverse_fracton"]}
    with pytest.raises(SweepError, match="did you mean 'reverse_fraction'"):
        parse_sweep(sweep_raw(space={"stages.0.mix.reverse_fraction": bad}), "s.yaml", base_raw=base)
    with pytest.raises(SweepError, match="linked to a swept path and also set elsewhere"):
        parse_sweep(
            sweep_raw(
                space={"stages.0.mix.reverse_fraction": {"grid": [0.0], "link": ["stages.0.lr"]}},
                overrides={"stages.0.lr": 0.1},
            ),
            "s.yaml",
            base_raw=base,
        )
    with pytest.raises(SweepError, match="link: expected a list of config paths"):
        parse_distribution("a", {"grid": [1], "link": []}, "f")


def test_overrides_accept_a_list_of_strings():
    spec = parse(overrides=["stages.0.lr=1e-3", "eval.limit=2"])
    assert spec.overrides == {"stages.0.lr": 1e-3, "eval.limit": 2}


def test_dry_run_text_lists_every_trial():
    text = describe_plan(parse(), "resources: {'CPU': 1.0}")
    assert "6 trial(s):" in text
    assert "[  5] stages.0.mix.reverse_fraction=1 seed=1" in text
    assert "resources: {'CPU': 1.0}" in text


SHIPPED = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_sweep_file_validates(path):
    spec = load_sweep(path)
    assert spec.num_trials() >= 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"search": {"name": "grid", "num_samples": 3}},
            "search.num_samples: unknown key 'num_samples' for search 'grid'",
        ),
        ({"overrides": ["stages.0.lr=1e-3", 5]}, "overrides: list items must be 'path=value' strings, got 5"),
        ({"overrides": ["stages.0.lr"]}, "overrides: override 'stages.0.lr': expected PATH=VALUE"),
        (
            {"tracking": {"mlflow": {"tracking_url": "x"}}},
            "tracking.mlflow.tracking_url: unknown key 'tracking_url'",
        ),
        (
            {"tracking": ["tensorboard", "wandbb"]},
            "tracking: unknown tracker 'wandbb'; valid: tensorboard, mlflow, wandb (did you mean 'wandb'?)",
        ),
        ({"tracking": {"wandb": {"mode": "offlin"}}}, "tracking.wandb.mode: 'offlin' is not one of"),
        (
            {"scheduler": {"name": "asha", "reduction_factor": 1}},
            "scheduler.reduction_factor: expected a number > 1, got 1",
        ),
        ({"name": "a b"}, "name: expected a non-empty string without '/', '\\' or spaces, got 'a b'"),
        (
            {"overrides": {"stages.0.objective.name": "dpo", "stages.0.objective.beta": -1}},
            "stages.0.objective.beta: expected a number > 0, got -1",
        ),
    ],
)
def test_the_sweep_models_name_the_key(changes, message):
    with pytest.raises(SweepError) as err:
        parse(**changes)
    assert str(err.value).startswith("s.yaml: ") and message in str(err.value)


def test_null_keys_take_their_defaults_and_mlflow_takes_options():
    raw = {
        **sweep_raw(tracking={"mlflow": {"tracking_uri": "http://mlflow:5000"}}),
        "seeds": None,
        "search": None,
    }
    spec = parse_sweep(raw, "s.yaml", base_raw=BASE_RAW)
    assert spec.seeds == [0] and spec.search.name == "grid" and spec.search.num_samples == 1
    assert spec.tracking.mlflow.enabled and spec.tracking.mlflow.tracking_uri == "http://mlflow:5000"
    assert spec.tracking.mlflow.experiment_name is None
    stored = spec.to_dict()
    assert stored["space"] == {"stages.0.mix.reverse_fraction": {"grid": [0.0, 0.5, 1.0]}}
    assert stored["base_raw"] == BASE_RAW and stored["search"] == {"name": "grid"}
