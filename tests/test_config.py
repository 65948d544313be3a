from pathlib import Path

import pytest

from revmix.config import ConfigError, ExperimentConfig, build_config, describe, load_config, parse_override

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
            "unknown key(s) ['beta'] for objective 'sft'; valid keys: label_smoothing",
        ),
        ("stages.0.objective.name=dpx", "unknown objective 'dpx'; valid objectives:"),
        ("stages.0.lr=fast", "stages.0.lr: expected a number, got 'fast'"),
        ("stages.0.mix.reverse_fraction=1.5", "expected a value in [0, 1]"),
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


def test_every_field_has_a_reason():
    lines = describe()
    assert all("#" in ln or ln.endswith(":") or ": " in ln for ln in lines)
    assert not [ln for ln in lines if ln.rstrip().endswith("#")]
