"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest

from convert import convert
from scripted import make_scripted


@pytest.fixture(scope="session")
def scripted_gguf(tmp_path_factory):
    """The scripted Small 4-shaped model (see scripted.py), converted to Q8_0."""
    d = tmp_path_factory.mktemp("scripted")
    out = d / "scripted.gguf"
    convert(make_scripted(d / "hf"), out, "q8_0")
    return out
