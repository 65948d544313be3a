"""quiet_libraries: what it switches off by default, what --verbose leaves alone, and how workers learn it."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator

import huggingface_hub.utils as hf_hub_utils
import pytest
from transformers.utils import logging as hf_logging

from revmix.platform.console import NOISY_LOGGERS, VERBOSE_ENV, format_eta, quiet_libraries


@pytest.fixture
def loud(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Progress bars on, every warning shown, Ray's loggers at INFO; all put back afterwards."""
    monkeypatch.setenv(VERBOSE_ENV, "unset")  # so monkeypatch restores whatever quiet_libraries writes
    monkeypatch.delenv(VERBOSE_ENV)
    bars = hf_logging.is_progress_bar_enabled()
    levels = {n: logging.getLogger(n).level for n in NOISY_LOGGERS}
    hf_logging.enable_progress_bar()
    for n in NOISY_LOGGERS:
        logging.getLogger(n).setLevel(logging.INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def _shown(category: type[Warning], module: str) -> bool:
    """Whether a warning of ``category`` raised inside ``module`` reaches the console."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("msg", category, filename=f"{module}.py", lineno=1, module=module)
    return len(caught) == 1


def test_default_quiets_bars_library_warnings_and_ray_lines(loud: None) -> None:
    assert _shown(FutureWarning, "transformers.modeling_utils")  # the fixture shows everything
    assert quiet_libraries(False) is False
    assert not hf_logging.is_progress_bar_enabled() and hf_hub_utils.are_progress_bars_disabled()
    assert not _shown(FutureWarning, "transformers.modeling_utils")
    assert not _shown(UserWarning, "peft.tuners.lora")
    assert not _shown(UserWarning, "torch")
    assert _shown(UserWarning, "revmix.platform.train")  # revmix's own warnings still show
    assert _shown(RuntimeWarning, "torch.nn")  # only the two noisy categories are filtered
    assert _shown(UserWarning, "torchvision")  # the module match is a package, not a prefix
    assert all(logging.getLogger(n).level == logging.WARNING for n in NOISY_LOGGERS)
    assert os.environ[VERBOSE_ENV] == "0"


def test_verbose_leaves_everything_and_tells_ray_workers(loud: None) -> None:
    assert quiet_libraries(True) is True
    assert hf_logging.is_progress_bar_enabled() and not hf_hub_utils.are_progress_bars_disabled()
    assert _shown(FutureWarning, "transformers.modeling_utils")
    assert all(logging.getLogger(n).level == logging.INFO for n in NOISY_LOGGERS)
    assert os.environ[VERBOSE_ENV] == "1"
    assert quiet_libraries(None) is True  # a worker started by this driver: still verbose
    assert hf_logging.is_progress_bar_enabled()


def test_a_worker_without_the_variable_is_quiet(loud: None) -> None:
    assert quiet_libraries(None) is False
    assert not hf_logging.is_progress_bar_enabled()
    assert VERBOSE_ENV not in os.environ  # a worker reads the variable, never writes it


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(42, "42s"), (59.6, "1m00s"), (185, "3m05s"), (3720, "1h02m"), (7199, "1h59m"), (-3, "0s")],
)
def test_format_eta(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text
