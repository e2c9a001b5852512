"""The attack tables of README.md and docs/server.md, written from the test suite.

Each attack test carries ``@pytest.mark.attack(cls=..., tried=..., held=...)`` beside the code
that asserts it; this script reads those marks (from the test files' syntax, without running
them) and writes two tables between ``<!-- attacks:... -->`` comments: per class in the README
(attacks tried, all held), one row per attack in docs/server.md. CI runs every marked test, so
a landed table holds. ``tests/test_readme.py`` fails when the tables differ from the marks.

    python scripts/attack_table.py          # rewrite both tables
    python scripts/attack_table.py --check  # exit 1 if either differs
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The classes in the order the tables list them, with what each defends.
CLASSES = {
    "defaults": "limits on with no flags",
    "admission": "every allocation admitted before it happens",
    "counting": "what runs and transfers hold, counted to their user",
    "door": "no peer locks the door",
    "fairness": "every call queues as its caller",
    "isolation": "one user's runs invisible to another",
    "users file": "tokens, names and reloads",
    "wire": "nothing but plain values and exposed calls",
    "leaks": "nothing internal leaks",
}


@dataclass(frozen=True)
class Attack:
    cls: str
    tried: str
    held: str
    test: str  # file::function


def attacks(tests: Path = REPO / "tests") -> list[Attack]:
    """Every ``@pytest.mark.attack(...)`` in ``tests/test_*.py``, in file order."""
    found = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and ast.unparse(dec.func) == "pytest.mark.attack":
                    kw = {k.arg: ast.literal_eval(k.value) for k in dec.keywords}
                    if kw.get("cls") not in CLASSES:
                        raise ValueError(f"{path.name}::{node.name}: cls must be one of {sorted(CLASSES)}")
                    found.append(Attack(kw["cls"], kw["tried"], kw["held"], f"{path.name}::{node.name}"))
    return found


def summary_table(found: list[Attack]) -> str:
    rows = ["| class | what it defends | attacks tried | held | e.g. |", "| --- | --- | --- | --- | --- |"]
    for cls, defends in CLASSES.items():
        mine = [a for a in found if a.cls == cls]
        if mine:
            rows.append(f"| {cls} | {defends} | {len(mine)} | {len(mine)} | {mine[0].tried} → {mine[0].held} |")
    rows.append(f"| all | | {len(found)} | {len(found)} | each a test in `make test`, most against a real `djinn-server` process |")
    return "\n".join(rows)


def full_table(found: list[Attack]) -> str:
    rows = ["| class | attack tried | held | test |", "| --- | --- | --- | --- |"]
    for cls in CLASSES:
        for a in (a for a in found if a.cls == cls):
            rows.append(f"| {cls} | {a.tried} | {a.held} | `{a.test}` |")
    return "\n".join(rows)


BLOCK = re.compile(r"(<!-- attacks:(\w+) [^>]*-->\n)(.*?)(<!-- attacks:end -->)", re.S)


def rewrite(text: str, found: list[Attack]) -> str:
    tables = {"summary": summary_table(found), "full": full_table(found)}
    return BLOCK.sub(lambda m: m.group(1) + tables[m.group(2)] + "\n" + m.group(4), text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    found, stale = attacks(), []
    for page in (REPO / "README.md", REPO / "docs" / "server.md"):
        text = page.read_text()
        new = rewrite(text, found)
        if new != text:
            stale.append(page.name)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"stale attack tables in {', '.join(stale)}: run python scripts/attack_table.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
