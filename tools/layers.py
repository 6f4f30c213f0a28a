#!/usr/bin/env python3
"""The layer check run by `make lint`: a module of src/ may use only modules of its own layer
or of the layers below it (docs/architecture.md). It reads every `crate::NAME` path in a
file's non-test code, in `use` lines and inline alike (a field type `crate::status::X` counts),
so an upward import cannot hide.

Known upward imports that today's code still has are listed in KNOWN with the issue that
removes them. A new one fails the check; one that disappears must be taken off the list (the
check fails on a stale entry too), so the list only shrinks.
"""
import glob
import os
import re
import sys

# Bottom first. A module may use its own layer and those before it.
LAYERS = [
    ["clock"],
    ["protocol"],
    ["config"],
    ["message"],
    ["auth", "tls", "logging"],
    ["storage"],
    ["outbox"],
    ["session"],
    ["metrics"],
    ["broker"],
    ["cluster"],
    ["status"],
    ["connection"],
    ["bridge"],
    ["admin"],
    ["http"],
    ["websocket", "proxy"],
    ["listener"],
    ["reload"],
    ["ctl"],
    ["migrate"],
]

# (from, to): upward imports the code still has, each to be removed by issue 14.
KNOWN = set()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def rank_of():
    ranks = {}
    for i, layer in enumerate(LAYERS):
        for m in layer:
            ranks[m] = i
    return ranks


def imports():
    """{(from, to)} over non-test code of every top-level module of src/."""
    found = set()
    for path in glob.glob(os.path.join(ROOT, "**", "*.rs"), recursive=True):
        rel = os.path.relpath(path, ROOT)
        top = rel.split(os.sep)[0]
        top = top[:-3] if top.endswith(".rs") else top
        if top in ("lib", "main"):
            continue
        with open(path) as f:
            text = f.read()
        if rel.endswith(("tests.rs", "_tests.rs")) or rel.endswith(os.path.join("connection", "sim.rs")):
            continue
        text = re.split(r"#\[cfg\(test\)\]\s*\n\s*mod tests", text)[0]
        for m in re.finditer(r"\bcrate::(\w+)", text):
            if m.group(1) != top:
                found.add((top, m.group(1)))
    return found


# A module's hub: the file holding the type whose `impl` blocks are spread over the files named
# for their concerns (as a parent mod.rs holds `Broker`). The hub and those files refer to each
# other by nature (field types one way, `impl Hub` the other), so the hub is left out of the
# cycle check like a parent.
HUBS = {"connection": "client"}


def sibling_imports():
    """{top: {(from_sub, to_sub)}}: imports between the submodules of one top-level module
    (`crate::storage::codec` or `super::codec` from storage/record.rs), parent file excluded,
    over non-test code. Submodules have no order written down, but they must not form a
    cycle (issue 14: records and their encoding in one direction)."""
    edges = {}
    for path in glob.glob(os.path.join(ROOT, "*", "**", "*.rs"), recursive=True):
        rel = os.path.relpath(path, ROOT).split(os.sep)
        top, sub = rel[0], rel[1][:-3] if rel[1].endswith(".rs") else rel[1]
        if sub in ("mod", "tests", "sim") or sub.endswith("_tests") or rel[-1].endswith("tests.rs"):
            continue
        subs = {n[:-3] if n.endswith(".rs") else n for n in os.listdir(os.path.join(ROOT, top))}
        with open(path) as f:
            text = re.split(r"#\[cfg\(test\)\]\s*\n\s*mod tests", f.read())[0]
        refs = [m.group(1) for m in re.finditer(rf"\bcrate::{top}::(\w+)", text)]
        # `super::` names a sibling from a file directly under the module, `super::super::`
        # from one a level deeper.
        up = "super::" if len(rel) == 2 else "super::super::"
        refs += [m.group(1) for m in re.finditer(rf"(?<!::)\b{up}(\w+)", text)]
        for r in refs:
            if r in subs and r != sub and r != "mod" and HUBS.get(top) not in (r, sub):
                edges.setdefault(top, set()).add((sub, r))
    return edges


def cycles(edges):
    """Each cycle of the graph once, as a list of nodes."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    found, seen = [], set()

    def walk(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    found.append(path + [nxt])
            elif nxt not in path and nxt > path[0]:
                walk(nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def main():
    ranks = rank_of()
    found = imports()
    errors = []
    for top, edges in sorted(sibling_imports().items()):
        for c in cycles(edges):
            errors.append(f"import cycle inside `{top}`: {' -> '.join(c)}")
    for a, b in sorted(found):
        for m in (a, b):
            if m not in ranks:
                errors.append(f"module `{m}` is in no layer: add it to LAYERS in tools/layers.py")
        if a in ranks and b in ranks and ranks[b] > ranks[a] and (a, b) not in KNOWN:
            errors.append(f"`{a}` uses `{b}`, a layer above it (docs/architecture.md)")
    for a, b in sorted(KNOWN - found):
        errors.append(f"`{a}` no longer uses `{b}`: take ({a!r}, {b!r}) off KNOWN in tools/layers.py")
    for e in sorted(set(errors)):
        print(f"layers: {e}", file=sys.stderr)
    if errors:
        return 1
    print(f"layers: {len(found)} imports between {len(ranks)} modules, all downward "
          f"but {len(KNOWN)} known ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
