"""The controller image: what it holds. Its pod running in the cluster, serving the release's
AgentAutoscaler, and `helm uninstall` stopping it through the pre-delete hook, are tested on the
real node (tests/node/test_voice_on_node.py)."""

from __future__ import annotations

from tests.images.containers import BuiltImages, image_config, run_in_image


def test_the_image_holds_the_controller_and_nothing_else(images: BuiltImages) -> None:
    ref = images.refs["controller"]
    config = image_config(ref)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["morgana-controller"] and not config.get("Cmd")
    assert {"8080/tcp", "9102/tcp"} <= set(config["ExposedPorts"])
    for module, why in (
        ("pytest", "test dependencies"),
        ("sqlalchemy", "the API's database stack"),
        ("fastapi", "the API's web framework"),
        ("livekit.agents", "the voice worker's framework"),
        ("onnxruntime", "the voice worker's VAD runtime"),
    ):
        leaked = run_in_image(ref, "python", "-c", f"import {module}")
        assert leaked.returncode != 0, f"{why} ({module}) leaked into the controller image"
