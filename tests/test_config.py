from pathlib import Path

import pytest

from revmix.config import (
    ConfigError,
    ExperimentConfig,
    build_config,
    describe,
    load_config,
    parse_override,
    to_dict,
)
from revmix.objectives import objective_names

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((ROOT / "configs" / "runs").glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig) and cfg.stages


def test_overrides_reach_nested_paths_and_list_items():
    cfg = build_config(
        {"stages": [{"steps": 5}, {"name": "dpo", "objective": {"name": "sft"}, "steps": 3}]},
        ["stages.1.lr=0.1", "model.lora.r=4", "data.families=[affine_mod]", "runtime.use_gpu=null"],
    )
    assert cfg.stages[1].lr == 0.1 and cfg.model.lora.r == 4
    assert cfg.data.families == ["affine_mod"] and cfg.runtime.use_gpu is None
    assert cfg.stages[0].lr == 3e-3  # defaults untouched


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.0.mix.revrse_fraction=0.2", "did you mean 'reverse_fraction'"),
        ("stages.3.lr=1", "index 3 out of range; stages has 1 item(s)"),
        ("model.scale=huge", "model.scale: 'huge' is not one of tiny, small, base"),
        (
            "stages.0.objective.beta=0.1",
            "stages.0.objective.beta: unknown key 'beta' for objective 'sft'; valid keys: label_smoothing",
        ),
        (
            "stages.0.objective.name=dpx",
            f"stages.0.objective.name: 'dpx' is not one of {', '.join(objective_names())}",
        ),
        ("stages.0.lr=fast", "stages.0.lr: expected a number, got 'fast'"),
        (
            "stages.0.mix.reverse_fraction=1.5",
            "stages.0.mix.reverse_fraction: expected a number in [0, 1], got 1.5",
        ),
        ("stages.x.lr=1", "stages is a list; expected an index"),
    ],
)
def test_bad_overrides_name_the_path(override, message):
    with pytest.raises(ConfigError) as e:
        build_config({"stages": [{"steps": 5}]}, [override])
    assert message in str(e.value)


def test_unknown_key_in_yaml_names_file_and_path(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  lora: {rank: 4}\nstages: [{steps: 1}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "model.lora.rank: unknown key" in str(e.value)


def test_parse_override_values_are_yaml():
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_batch_must_divide_across_workers():
    with pytest.raises(ConfigError, match="not divisible"):
        build_config({"stages": [{"steps": 1, "batch_size": 5}], "runtime": {"num_workers": 2}})


def test_logp_kernel_loads_from_yaml_and_overrides_and_refuses_what_cannot_run(tmp_path):
    assert build_config({"stages": [{"steps": 1}]}).runtime.logp_kernel == "auto"
    p = tmp_path / "run.yaml"
    p.write_text("runtime: {logp_kernel: cce}\nstages: [{steps: 1}]\n")
    cfg = load_config(p)
    assert cfg.runtime.logp_kernel == "cce"
    assert build_config(to_dict(cfg)).runtime.logp_kernel == "cce"  # what a run's config.yaml reloads as
    assert load_config(p, ["runtime.logp_kernel=chunked"]).runtime.logp_kernel == "chunked"
    with pytest.raises(ConfigError) as e:
        load_config(p, ["runtime.logp_kernel=fused"])
    assert "runtime.logp_kernel: 'fused' is not one of auto, chunked, cce" in str(e.value)
    fsdp = ["runtime.strategy=fsdp", "runtime.num_workers=2", "stages.0.batch_size=2"]
    with pytest.raises(ConfigError, match=r"runtime.logp_kernel=cce reads the whole lm_head weight.*fsdp"):
        load_config(p, fsdp)
    assert load_config(p, [*fsdp, "runtime.logp_kernel=auto"]).runtime.logp_kernel == "auto"


def test_every_field_has_a_reason():
    lines = describe()
    assert all("#" in ln or ln.endswith(":") or ": " in ln for ln in lines)
    assert not [ln for ln in lines if ln.rstrip().endswith("#")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # a typed objective hyper-parameter, range-checked by its own module, named by its dotted path
        (
            ["stages.0.objective.name=dpo", "stages.0.objective.beta=-1"],
            "stages.0.objective.beta: expected a number > 0, got -1",
        ),
        (
            ["stages.0.objective.name=ppo", "stages.0.objective.ppo_epochs=0"],
            "stages.0.objective.ppo_epochs: expected an integer >= 1, got 0",
        ),
        (["stages.0.lr=.inf"], "stages.0.lr: expected a finite number, got inf"),
        (["stages.0.lr=.nan"], "stages.0.lr: expected a finite number, got nan"),
        (["stages.0.lr=0"], "stages.0.lr: expected a number > 0, got 0"),
        (["stages.0.max_grad_norm=-1"], "stages.0.max_grad_norm: expected a number >= 0, got -1"),
        (["stages.0.steps=0"], "stages.0.steps: expected an integer >= 1, got 0"),
        (["stages.0.steps=-1"], "stages.0.steps: expected an integer >= 1, got -1"),
        (["stages.0.steps=null", "stages.0.epochs=0"], "stages.0.epochs: expected a number > 0, got 0"),
        (["stages.0.steps=null"], "stages.0: set either steps or epochs"),
        (
            ["stages.0.mix.schedule.start=2"],
            "stages.0.mix.schedule.start: expected a number in [0, 1], got 2",
        ),
        (
            ["stages.0.mix.schedule.kind=phases"],
            "stages.0.mix.schedule.phases: kind 'phases' needs at least one phase",
        ),
        (["stages.0.grad_accum=0"], "stages.0.grad_accum: expected an integer >= 1, got 0"),
        (["runtime.torch_threads=-1"], "runtime.torch_threads: expected an integer >= 0, got -1"),
        (["runtime.length_buckets=0"], "runtime.length_buckets: expected an integer >= 1, got 0"),
        (["data.test_fraction=1"], "data.test_fraction: expected a number in (0, 1), got 1"),
        (["stages=[]"], "stages: expected a non-empty list, got []"),
        (["stages.0.lr.x=1"], "stages.0.lr.x: stages.0.lr is a value, not a mapping"),
    ],
)
def test_out_of_range_values_name_their_path(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_config({"stages": [{"steps": 5}]}, overrides, source="run.yaml")
    assert str(e.value).startswith("run.yaml: ") and message in str(e.value)


def test_objective_is_typed_and_switching_its_name_inherits_no_keys():
    cfg = build_config(
        {"stages": [{"steps": 5}]}, ["stages.0.objective.name=ppo", "stages.0.objective.kl_coef=0.1"]
    )
    assert cfg.stages[0].objective.name == "ppo" and cfg.stages[0].objective.kl_coef == 0.1
    assert build_config(to_dict(cfg)) == cfg  # a run's config.yaml round-trips


def test_help_config_covers_every_objective_hyper_parameter():
    lines = describe()
    assert (
        "stages.N.objective.beta = 0.1  # strength of the implicit KL to the reference (IPO's tau)" in lines
    )
    assert any(ln.startswith("stages.N.mix.schedule.phases.N.until = 1.0  # ") for ln in lines)
