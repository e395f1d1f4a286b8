"""`localmoe run` and `chat` without -m use the bundled `demo` preset. The bundled folder is pointed at a
test model here (the scripted one, whose reply is known), so these tests never need the real demo file."""
from __future__ import annotations

import io
import shutil

import pytest

from localmoe import registry
from localmoe.cli import main

from scripted import ANSWER_HEAD, ANSWER_LOOP, THINKING


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    """An empty bundled-data folder in place of localmoe/data, no $LOCALMOE_MODEL, no stdin."""
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(registry, "BUNDLED", data)
    monkeypatch.setenv("LOCALMOE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "500")          # `models` lines unwrapped
    monkeypatch.delenv("LOCALMOE_MODEL", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    return data


def test_run_without_a_model_uses_the_demo(bundled, scripted_gguf, capsys):
    shutil.copy(scripted_gguf, bundled / "demo.gguf")
    main(["run", "-n", "6", "--effort", "high", "--show-thinking", "hi"])
    out, err = capsys.readouterr()
    assert out == ANSWER_HEAD + ANSWER_LOOP * 2 + "\n"       # [THINK], thinking and [/THINK] come first
    assert THINKING in err
    main(["models"])
    out, _ = capsys.readouterr()
    assert "demo (default)" in out and f"{bundled / 'demo.gguf'} (bundled, present)" in out


@pytest.mark.parametrize("args", [["run", "hi"], ["chat"]])
def test_missing_bundled_demo_is_a_one_line_error(bundled, capsys, args):
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    lines = [l for l in err.splitlines() if l.strip() and "Compiling kernels" not in l]
    assert len(lines) == 1 and "bundled model 'demo' is missing" in lines[0] and str(bundled / "demo.gguf") in lines[0]
    main(["models"])
    assert "(bundled, but missing: reinstall localmoe)" in capsys.readouterr().out
