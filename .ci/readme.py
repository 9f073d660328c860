"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto; this needs only nbdev's notebook reader).

Usage: python .ci/readme.py [--check]   (--check: exit 1 if README.md is not what the notebook gives)
"""
import sys
from pathlib import Path
from execnb.nbio import read_nb
from nbdev.process import extract_directives

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = {"hide", "export", "exports", "exporti", "default_exp"}


def _text(x) -> str:
    return "".join(x) if isinstance(x, list) else str(x)


def cell_markdown(cell) -> str:
    "Markdown for one cell: markdown as is; code fenced, followed by its text outputs."
    if cell.cell_type == "markdown": return cell.source.strip()
    directives = extract_directives(cell, remove=True)
    if HIDDEN & set(directives) or not cell.source.strip(): return ""
    parts = ["```python\n" + cell.source.strip() + "\n```"]
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream": parts.append("```\n" + _text(out["text"]).rstrip() + "\n```")
        elif "data" in out:
            data = out["data"]
            if "text/markdown" in data: parts.append(_text(data["text/markdown"]).strip())
            elif "text/plain" in data: parts.append("```\n" + _text(data["text/plain"]).rstrip() + "\n```")
    return "\n\n".join(parts)


def render(nb_path: Path) -> str:
    nb = read_nb(nb_path)
    blocks = [cell_markdown(c) for c in nb.cells]
    header = "<!-- Generated from nbs/index.ipynb by .ci/readme.py; edit the notebook, not this file. -->\n\n"
    return header + "\n\n".join(b for b in blocks if b) + "\n"


def main(argv) -> int:
    text, readme = render(ROOT / "nbs" / "index.ipynb"), ROOT / "README.md"
    if "--check" in argv:
        if readme.read_text(encoding="utf-8") != text:
            print("README.md is out of date: run `python .ci/readme.py`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
