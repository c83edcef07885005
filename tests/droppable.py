"""The recipe each script's fence promises: delete an optional block and its marked lines, and the copy still runs.

Below the fence a section starts at a heading line `# --- optional: NAME ---` (or `# --- TITLE ---` for a section
a copy keeps) and runs to the next heading. Anywhere else, a line whose trailing comment reads `# optional: NAME`
(or `# optional: NAME, OTHER`) starts a statement that belongs to block NAME: deleting the block deletes that whole
statement (its body, its else branch, its continuation lines) and the docstring after it (an Args field's).
"""

import ast
import re

HEADING = re.compile(r"^# --- (.+?) ---\s*$")
OPTIONAL = re.compile(r"^optional: ([\w-]+)")
MARK = re.compile(r"#\s*optional:\s*([\w-]+(?:\s*,\s*[\w-]+)*)\s*$")


def sections(source: str) -> list[str]:
    """The optional sections' names, in file order."""
    found = (OPTIONAL.match(m.group(1)) for m in map(HEADING.match, source.splitlines()) if m)
    return [m.group(1) for m in found if m]


def marks(source: str) -> dict[int, set[str]]:
    """Line number (1-based) -> the blocks its trailing comment names."""
    marked = {}
    for i, line in enumerate(source.splitlines(), 1):
        m = MARK.search(line)
        if m and not line.lstrip().startswith("#"):
            marked[i] = {name.strip() for name in m.group(1).split(",")}
    return marked


def drop(source: str, names: set[str]) -> str:
    """`source` with the optional sections `names` and every statement marked with one of them deleted."""
    lines = source.splitlines(keepends=True)
    unknown = set(names) - set(sections(source)) - set().union(*marks(source).values())
    assert not unknown, f"no optional block named {sorted(unknown)}"
    gone, current = set(), None
    for i, line in enumerate(lines):
        if m := HEADING.match(line):
            current = (o.group(1) if (o := OPTIONAL.match(m.group(1))) else None)
        if current in names:
            gone.add(i)
    marked = {n: b for n, b in marks(source).items() if b & set(names)}
    started = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody", "handlers"):
            body = getattr(node, field, None)
            if not isinstance(body, list):
                continue
            for k, stmt in enumerate(body):
                first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
                if stmt.lineno in marked or first in marked:
                    started.add(stmt.lineno if stmt.lineno in marked else first)
                    gone.update(range(first - 1, stmt.end_lineno))
                    after = body[k + 1] if k + 1 < len(body) else None
                    if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                        gone.update(range(after.lineno - 1, after.end_lineno))
    stray = sorted(set(marked) - started)
    assert not stray, f"lines {stray} carry an `# optional:` mark but start no statement"
    # A body left empty gets `pass`, so an `if`/`else`/`with` around deleted lines still parses.
    inserts = {}
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list) or not body or isinstance(node, ast.Module):
                continue
            if all(set(range(s.lineno - 1, s.end_lineno)) <= gone for s in body):
                if not getattr(node, "lineno", None) or node.lineno - 1 not in gone:
                    first = body[0]
                    inserts[first.lineno - 1] = " " * first.col_offset + "pass\n"
    out = []
    for i, line in enumerate(lines):
        if i in inserts:
            out.append(inserts[i])
        if i not in gone:
            out.append(line)
    return "".join(out)
