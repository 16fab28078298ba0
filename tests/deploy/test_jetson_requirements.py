"""The Jetson install recipe (deploy/jetson/requirements-jetpack6.txt) parses, covers every station
dependency of pyproject.toml, and never pulls a pip OpenCV / TensorRT that would shadow JetPack's."""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # the station's own dependency on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "deploy" / "jetson" / "requirements-jetpack6.txt"
FROM_JETPACK = {"opencv-python-headless", "opencv-python", "opencv-contrib-python", "tensorrt", "pygobject"}


def _recipe() -> dict[str, Requirement]:
    reqs = {}
    for raw in RECIPE.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)  # raises InvalidRequirement on a malformed line
        reqs[canonicalize_name(req.name)] = req
    return reqs


def test_recipe_parses_and_covers_the_station_dependencies_except_jetpacks_own() -> None:
    reqs = _recipe()
    deps = {
        canonicalize_name(Requirement(d).name): Requirement(d)
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    assert set(deps) - FROM_JETPACK == set(reqs), "recipe and pyproject [project] dependencies drifted"
    assert not FROM_JETPACK & set(reqs), "a pip OpenCV / TensorRT would shadow JetPack's"
    # JetPack 6 is Python 3.10: the recipe's markers must select what 3.10 needs.
    env = {"python_version": "3.10", "python_full_version": "3.10.12", "platform_machine": "aarch64"}
    assert all(r.marker is None or r.marker.evaluate(env) for r in reqs.values())
    # JetPack's cv2 / TensorRT bindings are numpy 1.x builds.
    assert not reqs["numpy"].specifier.contains("2.0.0")
