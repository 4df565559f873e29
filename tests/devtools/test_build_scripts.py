"""The runners find the scripts that build their tools: a path off by one directory only shows on
a machine whose tool cache is cold."""

import pytest

from morgana_devtools import kube_apiserver, kube_node, livekit_server


@pytest.mark.parametrize("module", [kube_apiserver, kube_node, livekit_server])
def test_each_runner_points_at_its_build_script(module) -> None:
    script = module.BUILD_SCRIPT
    assert script.is_file(), script
    assert script.parent.name == "scripts" and (script.parent.parent / "pyproject.toml").is_file()
