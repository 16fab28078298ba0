"""The one strict key check: every unknown key named, dotted from the file's root, with the accepted ones."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from runtime.config.strict import field_names, refuse_unknown


class Oops(ValueError):
    pass


def test_known_keys_pass_and_unknown_ones_are_all_named_sorted():
    refuse_unknown({"path": 1}, ["path", "seed"], "data")
    with pytest.raises(Oops) as info:
        refuse_unknown({"pth": 1, "sed": 2, "path": 3}, ["path", "seed"], "c.toml: data", Oops)
    assert str(info.value) == "c.toml: data: unknown key(s) ['pth', 'sed']; expected some of ['path', 'seed']"


def test_a_section_dots_the_names_and_an_empty_where_adds_no_prefix():
    with pytest.raises(ValueError) as info:
        refuse_unknown({"fsp": 1}, ["fps"], "", section="cameras[0]")
    assert str(info.value) == "unknown key(s) ['cameras[0].fsp']; expected some of ['fps']"


def test_field_names_are_a_dataclass_fields():
    @dataclass
    class Spec:
        height: int = 1
        width: int = 2

    assert field_names(Spec) == {"height", "width"} and field_names(int) == set()
