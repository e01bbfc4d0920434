"""Optional dependencies (resta_fast/extras.py): a missing one is one line naming the
pip extra, exit 2; checking for one never imports it (the CLI's fast start-up).
Through the CLI: test_cli_startup.py::test_a_missing_extra_is_one_line_naming_it."""

import sys

import pytest

from resta_fast.errors import RestaError
from resta_fast.extras import require


def test_a_missing_module_names_what_needs_it_and_the_extra():
    with pytest.raises(RestaError) as info:
        require("resta_fast_no_such_module", "eval", "the demo")
    assert str(info.value) == (
        "the demo needs resta_fast_no_such_module, which is not installed: pip install 'resta-fast[eval]'"
    )
    assert info.value.exit_code == 2


def test_checking_for_a_module_does_not_import_it(tmp_path, monkeypatch):
    (tmp_path / "resta_heavy_probe.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    require("resta_heavy_probe", "eval", "the demo")  # found, not imported: nothing raised
    assert "resta_heavy_probe" not in sys.modules
