"""The AgentAutoscaler as the controller reads it (spec, with the CRD's defaults) and writes it (conditions)."""

import pytest
import yaml

from morgana_controller.resource import Condition, Conditions, InvalidSpec, parse_spec
from tests.controller.harness import CRDS

MINIMAL = {
    "targetRef": {"name": "agents"},
    "agentName": "morgana-agent",
    "livekit": {"url": "ws://livekit:7880", "credentialsSecretRef": {"name": "livekit"}},
}


def test_the_controller_applies_the_same_defaults_as_the_crd() -> None:
    crd = yaml.safe_load((CRDS / "agentautoscalers.morgana.dev.yaml").read_text())
    properties = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    spec = parse_spec(MINIMAL)
    for field in (
        "roomsPerWorker",
        "minReplicas",
        "maxReplicas",
        "headroom",
        "scaleDownStabilizationSeconds",
        "pollIntervalSeconds",
    ):
        attribute = "".join("_" + c.lower() if c.isupper() else c for c in field)
        assert getattr(spec, attribute) == properties[field]["default"], field
    redispatch = properties["redispatch"]["properties"]
    assert spec.redispatch.enabled is redispatch["enabled"]["default"]
    assert spec.redispatch.grace_seconds == redispatch["graceSeconds"]["default"]
    secret = properties["livekit"]["properties"]["credentialsSecretRef"]["properties"]
    assert spec.livekit.credentials_secret_ref.api_key_key == secret["apiKeyKey"]["default"]
    assert spec.livekit.credentials_secret_ref.api_secret_key == secret["apiSecretKey"]["default"]


def test_an_invalid_spec_says_what_is_wrong_in_the_resource_s_own_terms() -> None:
    with pytest.raises(InvalidSpec, match=r"minReplicas .5. must not exceed maxReplicas .2."):
        parse_spec({**MINIMAL, "minReplicas": 5, "maxReplicas": 2})
    with pytest.raises(InvalidSpec, match="roomsPerWorker"):
        parse_spec({**MINIMAL, "roomsPerWorker": 0})
    with pytest.raises(InvalidSpec, match="targetRef"):
        parse_spec({k: v for k, v in MINIMAL.items() if k != "targetRef"})
    with pytest.raises(InvalidSpec, match=r"livekit\.url"):
        parse_spec({**MINIMAL, "livekit": {"url": "livekit:7880", "credentialsSecretRef": {"name": "x"}}})


def test_a_condition_keeps_its_transition_time_until_its_status_changes() -> None:
    conditions = Conditions(
        [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Scaling",
                "message": "old",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ]
    )
    assert not conditions.set(Condition("Ready", "True", "Scaling", "new message"), generation=2)
    ready = conditions.as_list()[0]
    assert (ready["lastTransitionTime"], ready["message"], ready["observedGeneration"]) == (
        "2026-01-01T00:00:00Z",
        "new message",
        2,
    )
    assert conditions.set(Condition("Ready", "False", "SecretNotFound", "gone"), generation=2)
    assert conditions.as_list()[0]["lastTransitionTime"] != "2026-01-01T00:00:00Z"
    conditions.set(Condition("LiveKitReachable", "Unknown", "NotChecked", ""), generation=2)
    assert [c["type"] for c in conditions.as_list()] == ["Ready", "LiveKitReachable"]
