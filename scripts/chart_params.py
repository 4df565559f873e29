"""Print the parameters table of charts/morgana/README.md from the `## @param` lines of values.yaml.

    python scripts/chart_params.py            # print the table
    python scripts/chart_params.py --write    # replace the table in the chart README

tests/chart/test_chart_render.py fails when the README's table is out of date.
"""

import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "morgana"
BEGIN, END = "<!-- parameters:begin -->", "<!-- parameters:end -->"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def default(value: object) -> str:
    if isinstance(value, str):
        return f'`"{value}"`'
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip() + "`"


def table() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    lines: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("## @section "):
            lines += [
                "",
                f"### {line.removeprefix('## @section ')}",
                "",
                "| Key | Description | Default |",
                "|---|---|---|",
            ]
        elif line.startswith("## @param "):
            key, description = line.removeprefix("## @param ").split(" ", 1)
            node = values
            for part in key.split("."):
                node = node[part]
            lines.append(f"| `{key}` | {cell(description)} | {cell(default(node))} |")
    return "\n".join(lines).strip() + "\n"


def main() -> None:
    if "--write" not in sys.argv:
        print(table(), end="")
        return
    readme = CHART / "README.md"
    before, rest = readme.read_text().split(BEGIN, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{BEGIN}\n{table()}{END}{after}")


if __name__ == "__main__":
    main()
