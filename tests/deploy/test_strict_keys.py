"""deploy's config readers refuse unknown keys through runtime.config.strict, naming the dotted key."""

from __future__ import annotations

import pytest

from deploy.config import ConfigError, DeployConfig
from deploy.console.config import ConsoleConfigError
from deploy.console.config import from_dict as console_from_dict
from deploy.plc.config import PlcConfigError
from deploy.plc.config import from_dict as plc_from_dict


@pytest.mark.parametrize(
    "data, names",
    [
        ({"instal": {}}, "['instal']"),
        ({"install": {"kep": 1}}, "['install.kep']"),
    ],
)
def test_deploy_toml(data, names):
    with pytest.raises(ConfigError) as info:
        DeployConfig.from_dict(data, "deploy.toml")
    assert str(info.value).startswith(f"deploy.toml: unknown key(s) {names}; expected some of [")
    DeployConfig.from_dict({"install": {"keep": 1}}, "deploy.toml")


@pytest.mark.parametrize(
    "data, names",
    [
        ({"lisen": {}}, "['lisen']"),
        ({"listen": {"prot": 1}}, "['listen.prot']"),
    ],
)
def test_plc_toml(data, names):
    with pytest.raises(PlcConfigError) as info:
        plc_from_dict(data, "plc.toml")
    assert str(info.value).startswith(f"plc.toml: unknown key(s) {names}; expected some of [")


@pytest.mark.parametrize(
    "data, names",
    [
        ({"sever": {}}, "['sever']"),
        ({"server": {"prot": 1}}, "['server.prot']"),
        ({"stations": [{"name": "s1", "endpont": "tcp://x:1"}]}, "['stations[0].endpont']"),
        ({"alarms": {"sond": True}}, "['alarms.sond']"),
        (
            {"alarms": {"rules": [{"name": "r", "kind": "camera_down", "treshold": 0.1}]}},
            "['alarms.rules[0].treshold']",
        ),
        ({"shifts": {"time_zone": "UTC", "name": ["a"]}}, "['shifts.name']"),
    ],
)
def test_console_toml(data, names):
    with pytest.raises(ConsoleConfigError) as info:
        console_from_dict(data, "console.toml")
    assert str(info.value).startswith(f"console.toml: unknown key(s) {names}; expected some of [")
