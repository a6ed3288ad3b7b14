"""Run the Python code blocks of a Markdown file on a rank (module level so it pickles)."""
import re
from pathlib import Path

FENCE = re.compile(r"^```(\S*)\s*$")


def code_blocks(path):
    """[(first line number, language, code)] of every fenced block of the file."""
    blocks, lines, current = [], Path(path).read_text().splitlines(), None
    for n, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if m and current is None:
            current = (n + 1, m.group(1), [])
        elif m and current is not None:
            blocks.append((current[0], current[1], "\n".join(current[2])))
            current = None
        elif current is not None:
            current[2].append(line)
    if current is not None:
        raise ValueError(f"{path}: the code block opened at line {current[0] - 1} is never closed")
    return blocks


def as_one_script(path) -> str:
    """Every python block, each at its own line numbers (tracebacks point into the Markdown file)."""
    out = []
    for first, lang, code in code_blocks(path):
        if lang == "python":
            out += [""] * (first - 1 - len(out)) + code.splitlines()
    return "\n".join(out)


def run_markdown(rank, world, path):
    """exec the file's python blocks in order in one namespace; returns the names they defined."""
    namespace = {"__name__": "__integration_guide__"}
    exec(compile(as_one_script(path), str(path), "exec"), namespace)
    return sorted(k for k in namespace if not k.startswith("__"))
