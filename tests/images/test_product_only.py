"""Each image holds product code only: the dev support (devtools/: the model stand-in, service
runners, test helpers) and the tests never enter one, and each carries only its own packages."""

import pytest

from tests.images.containers import BuiltImages, run_in_image

SITE_PACKAGES = "/app/.venv/lib/python3.11/site-packages"
# Morgana's own top-level packages in each image.
OWN_PACKAGES = {"api": {"morgana"}, "agent": {"morgana"}, "controller": {"morgana", "morgana_controller"}}


@pytest.mark.parametrize("component", ["api", "agent", "controller"])
def test_the_image_carries_no_dev_support_and_no_tests(images: BuiltImages, component: str) -> None:
    ref = images.refs[component]
    # `grep -r devtools` over site-packages: nothing of Morgana's own mentions it. (Some libraries
    # do, about unrelated tools of that name: pydantic and python-devtools, grpc, pygments.)
    found = run_in_image(ref, "grep", "-rlI", "devtools", SITE_PACKAGES)
    ours = [path for path in found.stdout.split() if path.removeprefix(SITE_PACKAGES + "/").startswith("morgana")]
    assert ours == [], ours
    assert run_in_image(ref, "python", "-c", "import morgana_devtools").returncode != 0
    named = run_in_image(ref, "find", "/app", "-iname", "*devtools*")
    assert named.returncode == 0 and named.stdout.split() == [], named.stdout + named.stderr
    own = [f"{SITE_PACKAGES}/{package}" for package in sorted(OWN_PACKAGES[component])]
    test_code = run_in_image(
        ref, "find", *own, "-name", "tests", "-o", "-name", "conftest.py", "-o", "-name", "test_*.py"
    )
    assert test_code.returncode == 0 and test_code.stdout.split() == [], test_code.stdout + test_code.stderr
    listed = run_in_image(
        ref,
        "python",
        "-c",
        "import importlib.metadata as m; "
        "print(' '.join(sorted({d.metadata['Name'] for d in m.distributions() "
        "if d.metadata['Name'].startswith('morgana')})))",
    )
    expected = {"api": "morgana", "agent": "morgana", "controller": "morgana morgana-controller"}[component]
    assert listed.stdout.strip() == expected, listed.stdout + listed.stderr
    for package in OWN_PACKAGES[component]:
        assert run_in_image(ref, "test", "-d", f"{SITE_PACKAGES}/{package}").returncode == 0, package
