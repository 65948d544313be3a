"""Every YAML under configs/cluster validates offline; planted typos fail with file and JSON path named."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from revmix.cluster.schemas.kuberay import SCHEMAS
from revmix.cluster.validate import (
    ClusterConfigError,
    json_path,
    validate_kuberay,
    validate_launcher_config,
)

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "configs" / "cluster"
LAUNCHER = sorted(p for p in CLUSTER_DIR.glob("*.yaml"))
KUBERAY = sorted(CLUSTER_DIR.glob("kuberay/*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    out = tmp_path / name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_every_cluster_yaml_is_covered() -> None:
    every = sorted(CLUSTER_DIR.rglob("*.yaml")) + sorted(CLUSTER_DIR.rglob("*.yml"))
    assert {p.name for p in LAUNCHER} == {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob.yaml"}
    assert sorted(LAUNCHER + KUBERAY) == every, "a YAML under configs/cluster is validated by no test"


# -------------------------------------------------------------------------------------------- launcher ---


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_validates_and_has_the_promised_shape(path: Path) -> None:
    prepared = validate_launcher_config(path)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "the head must schedule no work"
    workers = {name: spec for name, spec in types.items() if name != prepared["head_node_type"]}
    cpu_types = [n for n, s in workers.items() if s["resources"]["GPU"] == 0 and s["resources"]["CPU"] > 0]
    gpu_classes = {k.split(":")[1] for s in workers.values() for k in s["resources"] if k.startswith("accel")}
    assert cpu_types and {"L4", "H100"} <= gpu_classes
    for name, spec in workers.items():
        assert spec["min_workers"] == 0 < spec["max_workers"], f"{name} must autoscale from zero"
        assert isinstance(spec["resources"]["memory"], int) and spec["resources"]["memory"] > 2**30
    assert prepared["idle_timeout_minutes"] > 0
    # Ray merged our setup commands into head/worker lists and added none of its own defaults.
    setup = prepared["setup_commands"]
    assert prepared["head_setup_commands"] == setup == prepared["worker_setup_commands"]
    joined = " ".join(setup)
    assert "==2.60.0" in joined and "torch==2.13.0" in joined and "vllm==0.32.0" in joined
    assert 'pip install --quiet -e "$HOME/revmix[vllm]"' in setup
    assert "git+" not in joined and "://" not in joined, "setup must install from the shipped tree"
    assert prepared["file_mounts"]["~/revmix"] == "."
    storage = [o for o in prepared["docker"]["run_options"] if "REVMIX_STORAGE=" in o]
    scheme = {"aws": "s3://", "gcp": "gs://"}[prepared["provider"]["type"]]
    assert len(storage) == 1 and scheme in storage[0]
    assert "--env RAY_AUTH_MODE=token" in prepared["docker"]["run_options"]


def test_launcher_typo_in_top_level_key_names_path_and_suggestion(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "aws.yaml")
    data["max_worker"] = data.pop("max_workers")
    bad = _write(tmp_path, "aws.yaml", data)
    with pytest.raises(ClusterConfigError) as exc:
        validate_launcher_config(bad)
    text = str(exc.value)
    assert str(bad) in text and "$.max_worker: unknown key 'max_worker'" in text
    assert "did you mean 'max_workers'" in text
    assert [p.path for p in exc.value.problems] == [("max_worker",)]


def test_launcher_typo_inside_node_type(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "gcp.yaml")
    data["available_node_types"]["gpu_l4"]["max_worker"] = 4
    with pytest.raises(
        ClusterConfigError, match=r"\$\.available_node_types\.gpu_l4\.max_worker: unknown key"
    ):
        validate_launcher_config(_write(tmp_path, "gcp.yaml", data))


def test_launcher_node_type_without_resources(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "aws.yaml")
    del data["available_node_types"]["cpu"]["resources"]
    bad = _write(tmp_path, "aws.yaml", data)
    with pytest.raises(ClusterConfigError) as exc:
        validate_launcher_config(bad)
    assert f"{bad}:" in str(exc.value)
    assert "$.available_node_types.cpu.resources: required key is missing" in str(exc.value)


def test_launcher_policy_requires_cpu_gpu_memory_and_all_command_lists(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "aws.yaml")
    data["available_node_types"]["gpu_l4"]["resources"] = {"CPU": 8, "GPU": 1}
    del data["setup_commands"]
    bad = _write(tmp_path, "aws.yaml", data)
    with pytest.raises(ClusterConfigError) as exc:
        validate_launcher_config(bad)
    paths = {json_path(p.path) for p in exc.value.problems}
    assert paths == {"$.available_node_types.gpu_l4.resources.memory", "$.setup_commands"}
    # without the revmix policy Ray accepts it (and would fill setup_commands from its defaults.yaml)
    prepared = validate_launcher_config(bad, strict=False)
    assert any("ray-wheels" in c or "pip install" in c for c in prepared["setup_commands"])


def test_launcher_fractional_resource_fails_ray_schema(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "aws.yaml")
    data["available_node_types"]["cpu"]["resources"]["CPU"] = 15.5
    with pytest.raises(ClusterConfigError, match=r"resources\.CPU: 15\.5 is not of type 'integer'"):
        validate_launcher_config(_write(tmp_path, "aws.yaml", data))


def test_launcher_rays_own_checks_run_after_the_schema(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "aws.yaml")
    data["head_node_type"] = "nohead"
    with pytest.raises(ClusterConfigError, match="head_node_type` must be one of `available_node_types"):
        validate_launcher_config(_write(tmp_path, "aws.yaml", data))
    data = _load(CLUSTER_DIR / "aws.yaml")
    data["available_node_types"]["cpu"]["min_workers"] = 20  # > global max_workers 13
    with pytest.raises(ClusterConfigError, match="smaller than the sum of `min_workers`"):
        validate_launcher_config(_write(tmp_path, "aws.yaml", data))


def test_duplicate_yaml_key_is_reported_with_line(tmp_path: Path) -> None:
    bad = tmp_path / "dup.yaml"
    bad.write_text((CLUSTER_DIR / "aws.yaml").read_text() + "\nmax_workers: 99\n")
    with pytest.raises(ClusterConfigError) as exc:
        validate_launcher_config(bad)
    (problem,) = exc.value.problems
    assert problem.path == ("max_workers",) and "duplicate key" in problem.message
    assert problem.line == len(bad.read_text().splitlines())


# --------------------------------------------------------------------------------------------- KubeRay ---


def test_kuberay_schemas_are_valid_draft7() -> None:
    for schema in SCHEMAS.values():
        jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_validates_and_has_the_promised_shape(path: Path) -> None:
    (doc,) = validate_kuberay(path)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "cpu" in groups and any(name.startswith("gpu") for name in groups)
    for g in groups.values():
        assert g["minReplicas"] == 0 < g["maxReplicas"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    for t in templates:
        for c in t["spec"]["containers"]:
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"], c["name"]
    if doc["kind"] == "RayJob":
        assert "revmix sweep configs/sweeps/quickstart.yaml --out " in doc["spec"]["entrypoint"]
        assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_kuberay_max_replica_typo_fails_with_path(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "kuberay" / "raycluster.yaml")
    group = data["spec"]["workerGroupSpecs"][1]
    group["maxReplica"] = group.pop("maxReplicas")
    bad = _write(tmp_path, "raycluster.yaml", data)
    with pytest.raises(ClusterConfigError) as exc:
        validate_kuberay(bad)
    text = str(exc.value)
    assert str(bad) in text
    assert (
        "$.spec.workerGroupSpecs[1].maxReplica: unknown key 'maxReplica' (did you mean 'maxReplicas'?)"
        in text
    )
    assert "$.spec.workerGroupSpecs[1].maxReplicas: required key is missing" in text


def test_kuberay_typo_in_nested_rayjob_cluster_spec(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "kuberay" / "rayjob.yaml")
    opts = data["spec"]["rayClusterSpec"]["autoscalerOptions"]
    opts["idleTimeoutSecond"] = opts.pop("idleTimeoutSeconds")
    data["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(ClusterConfigError) as exc:
        validate_kuberay(_write(tmp_path, "rayjob.yaml", data))
    paths = {json_path(p.path) for p in exc.value.problems}
    assert paths == {
        "$.spec.rayClusterSpec.autoscalerOptions.idleTimeoutSecond",
        "$.spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus",  # 0 is not the string "0"
    }


def test_kuberay_pod_template_is_permissive_but_its_top_is_not(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "kuberay" / "raycluster.yaml")
    pod = data["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["priorityClassName"] = "high"  # any Kubernetes pod field is accepted
    pod["containers"][0]["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    validate_kuberay(_write(tmp_path, "ok.yaml", data))
    data["spec"]["workerGroupSpecs"][0]["template"]["specs"] = data["spec"]["workerGroupSpecs"][0][
        "template"
    ].pop("spec")
    with pytest.raises(ClusterConfigError, match=r"workerGroupSpecs\[0\]\.template\.specs: unknown key"):
        validate_kuberay(_write(tmp_path, "bad.yaml", data))


def test_kuberay_cross_field_rules(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "kuberay" / "raycluster.yaml")
    data["spec"]["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2, replicas=5)
    data["spec"]["workerGroupSpecs"][2]["groupName"] = "cpu"
    data["spec"]["enableInTreeAutoscaling"] = False
    with pytest.raises(ClusterConfigError) as exc:
        validate_kuberay(_write(tmp_path, "rc.yaml", data))
    messages = {json_path(p.path): p.message for p in exc.value.problems}
    assert messages["$.spec.workerGroupSpecs[0].minReplicas"] == "minReplicas 5 > maxReplicas 2"
    assert "replicas 5 outside" in messages["$.spec.workerGroupSpecs[0].replicas"]
    assert "repeats group 0" in messages["$.spec.workerGroupSpecs[2].groupName"]
    assert "ignored" in messages["$.spec.enableInTreeAutoscaling"]


def test_rayjob_needs_exactly_one_cluster_source(tmp_path: Path) -> None:
    data = _load(CLUSTER_DIR / "kuberay" / "rayjob.yaml")
    data["spec"]["clusterSelector"] = {"ray.io/cluster": "revmix"}
    with pytest.raises(ClusterConfigError, match=r"\$\.spec: a RayJob needs exactly one of"):
        validate_kuberay(_write(tmp_path, "rj.yaml", data))


def test_multi_document_file_prefixes_document_index(tmp_path: Path) -> None:
    cluster = _load(CLUSTER_DIR / "kuberay" / "raycluster.yaml")
    broken = copy.deepcopy(cluster)
    broken["spec"]["rayVersio"] = broken["spec"].pop("rayVersion")
    bad = tmp_path / "two.yaml"
    bad.write_text(yaml.safe_dump(cluster) + "---\n" + yaml.safe_dump(broken))
    with pytest.raises(ClusterConfigError) as exc:
        validate_kuberay(bad)
    assert [json_path(p.path) for p in exc.value.problems] == ["$[1].spec.rayVersio"]
    assert exc.value.problems[0].line > len(yaml.safe_dump(cluster).splitlines())
    other = tmp_path / "svc.yaml"
    other.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n")
    with pytest.raises(ClusterConfigError, match="kind 'Service'.*known kinds: \\['RayCluster', 'RayJob'\\]"):
        validate_kuberay(other)


def test_json_path_quotes_keys_that_are_not_identifiers() -> None:
    assert json_path(("available_node_types", "ray.head.default", "resources")) == (
        "$.available_node_types['ray.head.default'].resources"
    )
    assert json_path(("spec", "workerGroupSpecs", 0, "maxReplica")) == "$.spec.workerGroupSpecs[0].maxReplica"
    assert json_path(()) == "$"
