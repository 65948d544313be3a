"""Offline validation of the cluster YAML revmix ships: Ray cluster-launcher configs and KubeRay manifests.

Nothing here touches a network or a cloud account, so CI can reject a typo before anyone pays for a node.

Launcher configs (``validate_launcher_config``) go through three gates:

1. Ray's own schema, ``ray/autoscaler/ray-schema.json`` from the installed wheel, with jsonschema Draft 7
   (every error, not just the first);
2. revmix policy (``strict=True``): every node type states ``CPU``, ``GPU`` and ``memory`` in
   ``resources``, and every command list is written out, because Ray merges a missing top-level key from the
   provider's ``defaults.yaml`` — which for AWS installs a nightly wheel from a remote URL and ``boto3``;
3. Ray's private ``ray.autoscaler._private.util.prepare_config`` + ``validate_config``, exactly what
   ``ray up`` runs first. For ``aws``/``gcp`` both only read the provider's ``defaults.yaml`` (no boto3, no
   googleapiclient, no credentials). What ``ray up`` does next — the provider's ``bootstrap_config``
   (IAM roles, key pairs, subnets, AMI/instance-type lookups) — needs the cloud API and is not run here.

KubeRay manifests (``validate_kuberay``) are checked against ``schemas/kuberay.py`` plus cross-field rules a
JSON schema cannot state (min <= replicas <= max, unique group names, autoscaler options that would be
ignored, a RayJob with both or neither of ``rayClusterSpec``/``clusterSelector``).

Every error names the file, the JSON path of the bad field and, when known, its YAML line.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from revmix.cluster.schemas.kuberay import API_VERSION, SCHEMAS
from revmix.validation import did_you_mean

PathKey = tuple[str | int, ...]

_REQUIRED_RESOURCES = ("CPU", "GPU", "memory")
_COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@dataclass(frozen=True)
class Problem:
    """One validation failure: where (JSON path, YAML line) and what."""

    path: PathKey
    message: str
    line: int | None = None

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line else file
        return f"{where}: {json_path(self.path)}: {self.message}"


class ClusterConfigError(ValueError):
    """A cluster config failed validation; ``problems`` lists every failure found, in file order."""

    def __init__(self, file: str | os.PathLike[str], problems: list[Problem]) -> None:
        self.file = str(file)
        self.problems = problems
        lines = [p.render(self.file) for p in problems]
        super().__init__(f"{self.file}: {len(problems)} problem(s)\n  " + "\n  ".join(lines))


def json_path(path: PathKey) -> str:
    """``('available_node_types', 'ray.head', 'resources')`` -> ``$.available_node_types['ray.head'].resources``."""
    out = "$"
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key):
            out += f".{key}"
        else:
            out += f"[{key!r}]"
    return out


# ----------------------------------------------------------------------------------------------- YAML ---


def _line_map(node: yaml.Node, path: PathKey, lines: dict[PathKey, int], dups: list[Problem]) -> None:
    """Record the 1-based line of every key/item under ``node``; collect duplicate mapping keys."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            if key in seen:
                msg = "duplicate key: YAML keeps only the last value, the earlier one is silently lost"
                dups.append(Problem(path + (key,), msg, lines[path + (key,)]))
            seen.add(key)
            _line_map(value_node, path + (key,), lines, dups)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), lines, dups)


def _load_documents(path: Path) -> list[tuple[Any, dict[PathKey, int], list[Problem]]]:
    """Every YAML document in ``path`` with its path->line map and duplicate-key problems."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ClusterConfigError(path, [Problem((), f"cannot read file: {e}")]) from None
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ClusterConfigError(
            path, [Problem((), f"invalid YAML: {e}", mark.line + 1 if mark else None)]
        ) from None
    out = []
    for node, doc in zip(nodes, docs):
        if node is None:
            continue
        lines: dict[PathKey, int] = {}
        dups: list[Problem] = []
        _line_map(node, (), lines, dups)
        out.append((doc, lines, dups))
    return out


# ----------------------------------------------------------------------------------------- jsonschema ---


def _line_for(path: PathKey, lines: dict[PathKey, int]) -> int | None:
    """Line of ``path``, or of its closest ancestor present in the file (for missing keys)."""
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _schema_problems(instance: Any, schema: dict[str, Any], lines: dict[PathKey, int]) -> list[Problem]:
    """All Draft 7 errors, with unknown keys and missing keys reported at their own path."""
    problems: list[Problem] = []
    for err in jsonschema.Draft7Validator(schema).iter_errors(instance):
        base: PathKey = tuple(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            known = list(err.schema.get("properties", {}))
            patterns = list(err.schema.get("patternProperties", {}))
            for key in err.instance:
                if key in known or any(re.search(p, key) for p in patterns):
                    continue
                msg = f"unknown key {key!r}{did_you_mean(key, known, n=1)}"
                msg += f"; valid keys: {sorted(known)}" if known else ""
                problems.append(Problem(base + (key,), msg, _line_for(base + (key,), lines)))
        elif err.validator == "required":
            missing = re.match(r"'([^']+)' is a required property", err.message)
            key = missing.group(1) if missing else "?"
            problems.append(Problem(base + (key,), "required key is missing", _line_for(base, lines)))
        else:
            problems.append(Problem(base, err.message, _line_for(base, lines)))
    return problems


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line or 0, json_path(p.path)))


# ------------------------------------------------------------------------------------------- launcher ---


def ray_launcher_schema() -> dict[str, Any]:
    """Ray's own launcher schema, from the installed ray package (the version the cluster will run)."""
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


def _policy_problems(config: dict[str, Any], lines: dict[PathKey, int]) -> list[Problem]:
    problems: list[Problem] = []
    node_types = config.get("available_node_types")
    if not isinstance(node_types, dict) or not node_types:
        return [Problem(("available_node_types",), "revmix configs must declare their node types", None)]
    for name, spec in node_types.items():
        resources = spec.get("resources") if isinstance(spec, dict) else None
        if not isinstance(resources, dict):
            continue  # the schema already reported it
        for key in _REQUIRED_RESOURCES:
            path = ("available_node_types", name, "resources", key)
            if key not in resources:
                msg = f"state {key} explicitly (the autoscaler plans with these numbers); revmix requires "
                problems.append(Problem(path, msg + str(list(_REQUIRED_RESOURCES)), _line_for(path, lines)))
    unpinned = (
        "write it out (use [] for none): Ray fills a missing command list from the provider's "
        "defaults.yaml, which may install packages you did not pin"
    )
    return problems + [Problem((key,), unpinned) for key in _COMMAND_KEYS if key not in config]


def validate_launcher_config(path: str | os.PathLike[str], strict: bool = True) -> dict[str, Any]:
    """Validate a ``ray up`` config offline; return it as Ray's ``prepare_config`` fills it in.

    Raises ``ClusterConfigError`` listing every problem as ``FILE:LINE: $.json.path: message``.
    ``strict=False`` skips the revmix policy checks (gate 2 in the module docstring).
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    docs = _load_documents(path)
    if len(docs) != 1 or not isinstance(docs[0][0], dict):
        raise ClusterConfigError(path, [Problem((), "expected exactly one YAML mapping (a launcher config)")])
    config, lines, problems = docs[0]
    problems = problems + _schema_problems(config, ray_launcher_schema(), lines)
    if strict:
        problems += _policy_problems(config, lines)
    if problems:
        raise ClusterConfigError(path, _sorted(problems))
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where: PathKey = tuple(e.absolute_path)
        raise ClusterConfigError(path, [Problem(where, f"after Ray's defaults: {e.message}")]) from None
    except (ValueError, RuntimeError, AssertionError, KeyError, NotImplementedError) as e:
        raise ClusterConfigError(path, [Problem((), f"Ray's validate_config: {e}")]) from None
    return prepared


# -------------------------------------------------------------------------------------------- KubeRay ---


def _replica_problems(spec: dict[str, Any], base: PathKey, lines: dict[PathKey, int]) -> list[Problem]:
    problems: list[Problem] = []
    groups = spec.get("workerGroupSpecs") or []
    names: dict[str, int] = {}
    for i, group in enumerate(groups):
        gpath = base + ("workerGroupSpecs", i)
        lo, hi, n = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1), group.get("replicas")
        if lo > hi:
            problems.append(Problem(gpath + ("minReplicas",), f"minReplicas {lo} > maxReplicas {hi}"))
        if n is not None and not lo <= n <= hi:
            problems.append(Problem(gpath + ("replicas",), f"replicas {n} outside [minReplicas {lo}, {hi}]"))
        name = group.get("groupName")
        if name in names:
            problems.append(
                Problem(gpath + ("groupName",), f"groupName {name!r} repeats group {names[name]}")
            )
        names.setdefault(name, i)
    if "autoscalerOptions" in spec and spec.get("enableInTreeAutoscaling") is not True:
        problems.append(
            Problem(base + ("enableInTreeAutoscaling",), "autoscalerOptions are ignored unless this is true")
        )
    auth = (spec.get("authOptions") or {}).get("mode")
    version = spec.get("rayVersion", "")
    if auth == "token" and re.match(r"^\d+\.\d+", version):
        major, minor = (int(x) for x in version.split(".")[:2])
        if (major, minor) < (2, 52):
            problems.append(Problem(base + ("rayVersion",), f"token auth needs Ray >= 2.52, got {version}"))
    return [Problem(p.path, p.message, _line_for(p.path, lines)) for p in problems]


def _semantic_problems(doc: dict[str, Any], lines: dict[PathKey, int]) -> list[Problem]:
    spec = doc.get("spec", {})
    if doc.get("kind") == "RayCluster":
        return _replica_problems(spec, ("spec",), lines)
    problems: list[Problem] = []
    has_spec, has_selector = "rayClusterSpec" in spec, "clusterSelector" in spec
    if has_spec == has_selector:
        msg = "a RayJob needs exactly one of rayClusterSpec or clusterSelector"
        problems.append(Problem(("spec",), msg, lines.get(("spec",))))
    if has_spec:
        problems += _replica_problems(spec["rayClusterSpec"], ("spec", "rayClusterSpec"), lines)
    if "runtimeEnvYAML" in spec:
        where = ("spec", "runtimeEnvYAML")
        try:
            env = yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as e:
            env, msg = None, f"not valid YAML: {e}"
        else:
            msg = f"must be a YAML mapping (a runtime_env), got {type(env).__name__}"
        if not isinstance(env, dict):
            problems.append(Problem(where, msg, lines.get(where)))
    return problems


def validate_kuberay(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Validate every document of a KubeRay manifest file offline; return the documents.

    Raises ``ClusterConfigError`` naming file, line and JSON path (prefixed with the document index when the
    file holds several documents).
    """
    path = Path(path)
    docs = _load_documents(path)
    if not docs:
        raise ClusterConfigError(path, [Problem((), "no YAML documents in file")])
    problems: list[Problem] = []
    for index, (doc, lines, dups) in enumerate(docs):
        prefix: PathKey = (index,) if len(docs) > 1 else ()

        def at(ps: list[Problem], prefix: PathKey = prefix) -> list[Problem]:
            return [Problem(prefix + p.path, p.message, p.line) for p in ps]

        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind not in SCHEMAS:
            msg = f"kind {kind!r} ({API_VERSION}) is not one revmix validates; known kinds: {sorted(SCHEMAS)}"
            problems += at([Problem(("kind",), msg, lines.get(("kind",)))])
            continue
        found = dups + _schema_problems(doc, SCHEMAS[kind], lines)
        if not found:
            found = _semantic_problems(doc, lines)
        problems += at(found)
    if problems:
        raise ClusterConfigError(path, _sorted(problems))
    return [doc for doc, _, _ in docs]
