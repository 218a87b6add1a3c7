"""Collapse progress-bar updates in the saved outputs of notebooks to each bar's final state.

`nbdev-test --save` stores every carriage-return update a progress bar printed (thousands of lines for a long
loop); a reader only needs the last. Run after refreshing the outputs:

    LLM_LIFECYCLE_PRESET=tiny nbdev-test --n-workers 0 --save && python tools/collapse_progress.py && nbdev-clean
"""
import json, sys
from pathlib import Path


def collapse(text:str) -> str:
    "Each line of `text` as a terminal shows it: only what follows the line's last carriage return."
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def main(paths) -> int:
    changed = 0
    for p in paths:
        nb = json.loads(Path(p).read_text(encoding="utf-8"))
        dirty = False
        for cell in nb["cells"]:
            for out in cell.get("outputs", []):
                if out.get("output_type") != "stream": continue
                text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
                new = collapse(text)
                if new != text:
                    out["text"] = new.splitlines(keepends=True); dirty = True
        if dirty:
            Path(p).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"); changed += 1
    print(f"collapsed progress output in {changed} of {len(paths)} notebooks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or sorted(str(p) for p in (Path(__file__).parent.parent/"nbs").glob("*.ipynb"))))
