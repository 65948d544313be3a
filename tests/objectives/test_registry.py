"""The objective registry and the declared contract of :class:`Objective` (no model, no Ray)."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

from revmix.config import StageConfig
from revmix.objectives.base import (
    Objective,
    build_objective,
    objective_class,
    objective_names,
    register_objective,
)
from revmix.objectives.sft import SFT
from revmix.validation import ConfigError, tagged_members


class Bare(Objective):
    """Declares only its name: every optional hook keeps the base's no-op default."""

    name: Literal["bare"] = "bare"


def test_optional_hooks_have_documented_no_op_defaults():
    policy = torch.nn.Linear(2, 2)
    assert Bare().prepare_policy(policy) == [] and Bare().release_policy(policy) is None
    assert (Bare.requires, Bare.needs_reference, Bare.needs_rollouts) == (
        frozenset({"response"}),
        False,
        False,
    )
    with pytest.raises(NotImplementedError, match=r"Bare must implement __call__\(policy, batch, ref\)"):
        Bare()(policy, None, None)  # type: ignore[arg-type]


def test_registration_rejects_duplicates_and_untyped_names():
    with pytest.raises(ValueError, match="objective 'sft' is already registered by SFT"):
        register_objective(SFT)

    class Untagged(Objective):
        name: str = "untagged"

    with pytest.raises(TypeError, match=r'must declare its name as name: Literal\["x"\] = "x"'):
        register_objective(Untagged)
    assert "untagged" not in objective_names() and "bare" not in objective_names()


def test_unknown_names_list_the_valid_ones():
    """One message for the lookup and the config: the valid names, the close ones, how to name a plug-in."""
    valid = ", ".join(objective_names())
    with pytest.raises(KeyError) as e:
        objective_class("dop")
    assert str(e.value) == (
        f"'dop' is not one of {valid} (did you mean 'dpo'?); a plug-in is named by its import path, "
        "pkg.module:ClassName"
    )
    with pytest.raises(ConfigError) as c:
        build_objective({"name": "sfft"}, path="stages.2.objective")
    assert str(c.value).startswith(
        f"stages.2.objective.name: 'sfft' is not one of {valid} (did you mean 'sft'?)"
    )


def test_the_config_type_holds_every_registered_objective():
    members = tagged_members(StageConfig.model_fields["objective"].annotation)
    assert sorted(members) == objective_names()
    assert all(members[name] is objective_class(name) for name in objective_names())


def test_registration_rejects_what_is_not_an_objective():
    with pytest.raises(
        TypeError, match=r"class Linear is not a subclass of revmix\.objectives\.base\.Objective"
    ):
        register_objective(torch.nn.Linear)  # type: ignore[arg-type]


def test_nested_route_errors_name_the_full_path():
    spec = {
        "name": "multitask",
        "routes": [{"objective": {"name": "sft"}}, {"objective": {"name": "dpo", "beta": 0}}],
    }
    with pytest.raises(
        ConfigError, match=r"^stages\.0\.objective\.routes\.1\.objective\.beta: expected a number > 0, got 0$"
    ):
        build_objective(spec, path="stages.0.objective")


def test_objectives_are_frozen_values():
    dpo = build_objective({"name": "dpo", "beta": 0.2})
    assert dpo == build_objective({"name": "dpo", "beta": 0.2}) != build_objective({"name": "dpo"})
    with pytest.raises(ValueError, match="frozen"):
        dpo.beta = 0.3  # type: ignore[misc]
