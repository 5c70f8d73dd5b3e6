"""The README's fenced code blocks, for the tests that run them (tests/test_readme.py) and for CI, which
runs some blocks verbatim: `python3 tests/readme.py "HEADING"` prints the commands of the one shell block
under that heading, one per line (`setup` for the set-up block).

Standard library only: CI calls it before anything is installed."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SETUP_HEADING = "Set up and run the tests"


@dataclasses.dataclass(frozen=True)
class Block:
    language: str  # the fence's info string: "bash", "python", "text", ...
    heading: str   # the nearest "#" heading above the block
    code: str
    line: int      # 1-based line of the opening fence in README.md

    def commands(self) -> list[str]:
        """Shell commands, one per line (comments and blank lines left out)."""
        return [line.strip() for line in self.code.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def blocks(path: pathlib.Path = README) -> list[Block]:
    found, heading, fence = [], "", None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            opening = re.match(r"^```(\w*)\s*$", line)
            if opening:
                fence, language, body = number, opening.group(1), []
        elif line.startswith("```"):
            found.append(Block(language, heading, "\n".join(body) + "\n", fence))
            fence = None
        else:
            body.append(line)
    if fence is not None:
        raise ValueError(f"{path}:{fence}: code block never closed")
    return found


def shell_block(heading: str, path: pathlib.Path = README) -> Block:
    """The one shell block under a heading."""
    candidates = [block for block in blocks(path) if block.heading == heading and block.language == "bash"]
    if len(candidates) != 1:
        raise ValueError(f"{path}: expected one bash block under '{heading}', found {len(candidates)}")
    return candidates[0]


def setup_block(path: pathlib.Path = README) -> Block:
    """The set-up block: what a newcomer runs, and CI verbatim."""
    return shell_block(SETUP_HEADING, path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit('usage: python3 tests/readme.py setup | "HEADING"')
    print("\n".join(shell_block(SETUP_HEADING if sys.argv[1] == "setup" else sys.argv[1]).commands()))
