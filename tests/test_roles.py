"""resolve_roles: which input plays which role, decided from the paths (no checkpoint opened)."""

import subprocess
import sys

import pytest

from resta_fast import options, roles
from resta_fast.errors import OptionError, cli_flag
from resta_fast.roles import resolve_roles


def test_roles_default_the_dare_base_and_refuse_bad_combinations(tmp_path):
    roles = resolve_roles("ft", aligned="chat", unaligned="shadow", dare=True)
    assert (roles.dare_base, roles.base, roles.lora) == ("chat", None, False)
    assert resolve_roles("ft", aligned="chat", unaligned="shadow").dare_base is None
    with pytest.raises(OptionError, match=r"^give either aligned and unaligned, or vector \(not both\)"):
        resolve_roles("ft", aligned="chat", unaligned="shadow", vector="v")
    with pytest.raises(OptionError, match=r"^give either aligned and unaligned"):
        resolve_roles("ft", aligned="chat")
    with pytest.raises(OptionError, match="^dare needs the model the fine-tune started from: pass dare_base"):
        resolve_roles("ft", vector="v", dare=True)
    with pytest.raises(OptionError, match="^base is only for LoRA adapters") as info:
        resolve_roles(tmp_path, aligned="chat", unaligned="shadow", base="b")
    assert info.value.render(cli_flag).startswith("--base is only for LoRA adapters")


def test_a_lora_adapter_gets_the_aligned_model_as_its_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    got = resolve_roles(tmp_path, aligned="chat", unaligned="shadow", dare=True)
    assert (got.lora, got.base, got.dare_base) == (True, "chat", "chat")
    with pytest.raises(OptionError, match="is a LoRA adapter: pass base"):
        resolve_roles(tmp_path, vector="v")


def test_options_still_exports_the_roles_where_they_were_first():
    assert (options.Roles, options.resolve_roles, options.ROLE_KINDS) == (
        roles.Roles,
        roles.resolve_roles,
        roles.ROLE_KINDS,
    )


def test_roles_module_imports_no_torch_and_no_numpy():
    """It is on every command's way in (options re-exports it, the CLI imports options)."""
    code = "import sys, resta_fast.roles; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
