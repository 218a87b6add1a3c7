"""Write README.md from nbs/index.ipynb without Quarto (nbdev-readme needs Quarto, which not every machine has).

    python tools/readme.py          # regenerate README.md
    python tools/readme.py --check  # exit 1 if README.md is out of date with nbs/index.ipynb
"""
import re, sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file. -->\n\n"


def render(nb_path: Path) -> str:
    "The README's Markdown: markdown cells as they are, visible code cells and their text output as code blocks."
    parts = []
    for cell in nbformat.read(nb_path, as_version=4).cells:
        src = cell.source.strip()
        if not src or re.match(r"#\|\s*hide", src): continue
        if cell.cell_type == "markdown":
            parts.append(src.replace("```{mermaid}", "```mermaid"))
        elif cell.cell_type == "code":
            parts.append(f"```python\n{src}\n```")
            text = "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))
            if text.strip(): parts.append(f"```\n{text.rstrip()}\n```")
    return HEADER + "\n\n".join(parts) + "\n"


def main(argv):
    readme, text = ROOT/"README.md", render(ROOT/"nbs"/"index.ipynb")
    if "--check" in argv:
        if not readme.exists() or readme.read_text(encoding="utf-8") != text:
            print("README.md is out of date with nbs/index.ipynb: run `python tools/readme.py` and commit it.", file=sys.stderr)
            return 1
        return 0
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
