#!/usr/bin/env python3
"""The shape of daemon/: which module includes which, and the longest functions.

    tests/tools/shape.py            the module graph, then the ten longest functions
    tests/tools/shape.py -n 20      the twenty longest

A module is daemon/NAME.c with include/popfetchd/NAME.h; a module "includes"
another when its .c or its header includes the other's header, directly or
through a header it includes. tests/unit/test_shape.py holds the code to the
layering of DESIGN.md §6 with these same functions.
"""
import argparse
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
DAEMON = ROOT / "daemon"
HEADERS = ROOT / "include" / "popfetchd"
INCLUDE = re.compile(r'^#include "popfetchd/([a-z0-9_]+)\.h"', re.M)
# A definition: the return type on one line, the name at the start of the next.
DEFINITION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\(")


def _direct(path):
    return set(INCLUDE.findall(path.read_text())) if path.exists() else set()


def modules():
    return sorted(p.stem for p in DAEMON.glob("*.c"))


def direct(name):
    """The modules whose headers NAME's .c or header includes itself."""
    return (_direct(DAEMON / f"{name}.c") | _direct(HEADERS / f"{name}.h")) - {name}


def includes(name):
    """The modules NAME depends on through includes (not itself)."""
    seen, todo = set(), _direct(DAEMON / f"{name}.c") | _direct(HEADERS / f"{name}.h")
    while todo:
        h = todo.pop()
        if h in seen:
            continue
        seen.add(h)
        todo |= _direct(HEADERS / f"{h}.h")
    seen.discard(name)
    return seen


def graph():
    return {m: includes(m) for m in modules()}


def cycles(g):
    """Pairs of modules that include each other, directly or not."""
    return sorted((a, b) for a in g for b in g[a] if a < b and a in g.get(b, ()))


def functions(paths=None):
    """(lines, file, name) of every function definition, longest first.
    A function runs from its return type's line to the closing brace in
    column 0 (the style of the code: clang-format, BSD-style definitions)."""
    rows = []
    for path in paths or sorted(DAEMON.glob("*.c")):
        lines = path.read_text().split("\n")
        i = 1
        while i < len(lines):
            m = DEFINITION.match(lines[i])
            if m and re.match(r"^[A-Za-z]", lines[i - 1]) and not lines[i - 1].startswith("#"):
                j = i
                while j < len(lines) and lines[j] != "}":
                    if lines[j].endswith(";") and j == i:
                        break  # a declaration
                    j += 1
                if j < len(lines) and lines[j] == "}":
                    rows.append((j - i + 2, path.relative_to(ROOT).as_posix(), m.group(1)))
                    i = j
            i += 1
    return sorted(rows, key=lambda r: (-r[0], r[1], r[2]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=10, help="how many functions to list")
    n = ap.parse_args().n
    g = graph()
    width = max(len(m) for m in g)
    print("module graph (a module: the modules whose headers it includes)")
    for m in g:
        print(f"  {m:<{width}}  {' '.join(sorted(direct(m))) or '-'}")
    for a, b in cycles(g):
        print(f"  cycle: {a} <-> {b}")
    print(f"\nthe {n} longest functions (lines, return type to closing brace)")
    for length, path, name in functions()[:n]:
        print(f"  {length:4d}  {path}  {name}")


if __name__ == "__main__":
    main()
