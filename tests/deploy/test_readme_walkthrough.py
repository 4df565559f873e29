"""The README's "Deploy with Helm" walk-through, run line by line (with recording stand-ins for
helm, kubectl and docker), installs the same releases, charts, versions and values files as
deploy/install.sh, so a newcomer pasting it gets what the tested script does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.deploy.conftest import ROOT
from tests.deploy.test_install_script import flag, helm_installs, recorded, run_install


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def walkthrough() -> str:
    """The first bash block of the section: the sequence itself."""
    match = re.search(r"```bash\n(.*?)```", readme_section("Deploy with Helm"), re.S)
    assert match, "README's Deploy with Helm section has no bash block"
    return match[1]


def installs_summary(argv_by_release: dict[str, list[str]]) -> dict[str, tuple]:
    def values(argv: list[str]) -> str | None:
        for name in ("-f", "--values"):
            if name in argv:
                return Path(flag(argv, name)).name
        return None

    return {
        release: (
            argv[3].removeprefix(str(ROOT) + "/"),
            flag(argv, "--version") if "--version" in argv else None,
            flag(argv, "--namespace"),
            values(argv),
        )
        for release, argv in argv_by_release.items()
    }


def test_readme_walkthrough_installs_what_install_sh_installs(shims: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, record = shims
    run_install(env={"RECORD": str(record)}, path_prefix=bin_dir)
    script = installs_summary(helm_installs(recorded(record)))

    readme_record = tmp_path / "readme.jsonl"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "RECORD": str(readme_record),
            "HOME": str(tmp_path),
            "OPENAI_API_KEY": "sk-readme",
        },
    )
    assert result.returncode == 0, result.stderr
    readme = installs_summary(helm_installs(recorded(readme_record)))
    assert readme == script

    # The same Secrets with the same keys.
    assert secret_keys(recorded(readme_record)) == secret_keys(recorded(record))
    assert secret_keys(recorded(readme_record))["morgana-secrets"] == ["agent-password", "jwt-secret", "openai-api-key"]


def secret_keys(calls: list[dict]) -> dict[str, list[str]]:
    return {
        c["argv"][c["argv"].index("generic") + 1]: sorted(
            a.removeprefix("--from-literal=").split("=", 1)[0] for a in c["argv"] if a.startswith("--from-literal=")
        )
        for c in calls
        if c["tool"] == "kubectl" and "generic" in c["argv"]
    }
