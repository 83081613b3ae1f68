"""The README's Python examples run as written (a user pastes them)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write model.npz into the working directory
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    if "loss" in namespace:  # the training example: the loss it prints has come down
        assert np.isfinite(namespace["loss"]) and namespace["loss"] < 0.05
    if "again" in namespace:  # the usage example: the saved model loads with the same weights
        for name, value in namespace["lstm"].params.items():
            np.testing.assert_array_equal(namespace["again"].params[name], value)
