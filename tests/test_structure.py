"""The shape of the source tree, read as text (ast, tokenize; nothing imported): short functions and
files, an import graph without cycles, and no block of code copied to a second place.

The tree is the installed package: `layerwise/` plus `models/` and `calib_data/`, which pyproject's
package-dir installs as `layerwise.models` and `layerwise.calib_data`.
"""

from __future__ import annotations

import ast
import io
import keyword
import re
import tokenize
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60  # `def` line to last line, docstring included
MAX_FILE_LINES = 500
WINDOW = 9  # a copy is more than 8 consecutive lines of the same shape


def package_dirs() -> dict[str, Path]:
    """Package name → folder, from pyproject's `package-dir` (regex: tomllib is not in Python 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    table = re.search(r"^package-dir\s*=\s*\{(.*)\}", text, re.M)
    assert table, "pyproject.toml has no [tool.setuptools] package-dir table"
    return {name: REPO / folder for name, folder in re.findall(r'"([\w.]+)"\s*=\s*"([\w./]+)"', table.group(1))}


def source_files() -> dict[str, Path]:
    """Module name → file, for every .py file below the package folders (a nested package folder
    maps to the package mapped to it, not twice)."""
    dirs = package_dirs()
    owned = {folder.resolve() for folder in dirs.values()}
    modules: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts or any((folder / Path(*parts[:i])).resolve() in owned for i in range(1, len(parts))):
                continue
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = source_files()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def where(module: str, line: int | None = None) -> str:
    path = MODULES[module].relative_to(REPO)
    return f"{path}:{line}" if line else str(path)


# ---- (a) sizes -----------------------------------------------------------------------------------
def test_no_function_over_60_lines():
    long = [f"{where(m, node.lineno)} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for m, tree in TREES.items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_no_file_over_500_lines():
    long = [f"{where(m)}: {n} lines" for m, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(long)


# ---- (b) import graph ----------------------------------------------------------------------------
def internal(name: str) -> str | None:
    """The module of ours that importing `name` executes last (its longest known prefix), or None."""
    for top in ("models", "calib_data"):  # as a script inside the repository would spell them
        if name == top or name.startswith(top + "."):
            name = "layerwise." + name
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement of `module`, those inside
    functions included. The parent packages Python runs first are not edges: only what is named."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            base = ".".join([*base, *([node.module] if node.module else [])])
            # `from . import x` imports the module x; `from .m import f` imports m
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found += [(target, node.lineno) for t in targets if (target := internal(t)) and target != module]
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module → {imported module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for module in MODULES:
        edges: dict[str, int] = {}
        for target, line in imports(module):
            edges.setdefault(target, line)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """For each strongly connected part of the graph, the shortest cycle [a, ..., a] through each
    of its modules (each cycle once): every loop there is to cut."""
    found: dict[frozenset, list[str]] = {}
    for component in components(graph):
        for start in sorted(component):
            cycle = shortest_cycle(graph, start, component)[:-1]
            first = cycle.index(min(cycle))  # written from its first module in sorted order
            cycle = cycle[first:] + cycle[:first]
            found.setdefault(frozenset(zip(cycle, cycle[1:] + cycle[:1])), [*cycle, cycle[0]])
    return sorted(found.values())


def components(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components with a cycle (Tarjan; self-imports are not edges here)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = set()
            while not part or member != node:
                member = stack.pop()
                part.add(member)
            if len(part) > 1:
                found.append(part)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def shortest_cycle(graph: dict[str, dict[str, int]], start: str, within: set[str]) -> list[str]:
    """Breadth-first from `start` back to it, inside one strongly connected component."""
    came_from = {start: ""}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if nxt in within and nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is on no cycle")


def test_mapping_finds_the_tree():
    assert {"layerwise", "layerwise.cli", "layerwise.models", "layerwise.calib_data"} <= set(MODULES)
    assert internal("calib_data.sources") == "layerwise.calib_data.sources"
    assert internal("layerwise.solvers.gptq.gptq") == "layerwise.solvers.gptq"
    assert internal("torch.nn") is None
    assert "layerwise.distributed" in dict(imports("layerwise.cli"))  # `from . import distributed`, in a function


def test_cycles_reports_every_loop():
    graph = {"a": {"b": 1}, "b": {"c": 2, "a": 5}, "c": {"a": 3}, "d": {"e": 4}, "e": {}}
    assert cycles(graph) == [["a", "b", "a"], ["a", "b", "c", "a"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_import_graph_has_no_cycle():
    graph = import_graph()
    loops = cycles(graph)
    report = [" → ".join(c) + "".join(f"\n    {a} imports {b} at {where(a, graph[a][b])}" for a, b in zip(c, c[1:]))
              for c in loops]
    assert not loops, f"{len(loops)} import cycles:\n" + "\n".join(report)


# ---- (c) copied blocks ---------------------------------------------------------------------------
KEEP = set(keyword.kwlist) | {"self", "cls"}
ALWAYS_TRIVIAL = {"return", "pass", "continue", "break", "else :", "try :", "finally :", "S"}


def shape_lines(source: str) -> list[tuple[int, str]]:
    """(line number, shape) of each line of code: identifiers → N, strings → S, numbers → 0, keywords
    and operators kept, whitespace folded; blank lines, comments and import statements dropped."""
    shapes: dict[int, list[str]] = defaultdict(list)
    statement: list[tokenize.TokenInfo] = []
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NEWLINE:
            if statement and statement[0].string not in ("import", "from"):
                for t in statement:
                    shapes[t.start[0]].append(_shape(t))
            statement = []
        elif tok.type not in skip:
            statement.append(tok)
    return sorted((line, " ".join(parts)) for line, parts in shapes.items())


def _shape(tok: tokenize.TokenInfo) -> str:
    if tok.type == tokenize.NAME:
        return tok.string if tok.string in KEEP else "N"
    if tok.type == tokenize.STRING or tok.type in _FSTRING_TYPES:
        return "S"
    if tok.type == tokenize.NUMBER:
        return "0"
    return tok.string


# Python 3.12 splits f-strings into several tokens; each becomes S (adjacent S's fold below)
_FSTRING_TYPES = {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, n)}


def trivial(shape: str) -> bool:
    """Boilerplate that repeats without being a copy: lone brackets, bare return / pass, a
    docstring, a decorator. (Rows of a literal table are not trivial: a table repeating the
    same entry shape should be built by a helper.)"""
    words = re.sub(r"S( S)+", "S", shape).split()
    brackets = all(w in set("()[]{}:,") for w in words)
    return " ".join(words) in ALWAYS_TRIVIAL or words[0] == "@" or brackets


def copies(sources: dict[str, str]) -> list[str]:
    """Regions of at least WINDOW lines of the same shape in two places (two files, or two
    non-overlapping stretches of one), each pair once, as 'a:lines ≈ b:lines'. sources: name → text."""
    seen: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    lines: dict[str, list[tuple[int, str]]] = {}
    for module, source in sources.items():
        lines[module] = shape_lines(source)
        shapes = [s for _, s in lines[module]]
        for i in range(len(shapes) - WINDOW + 1):
            window = tuple(shapes[i : i + WINDOW])
            if sum(map(trivial, window)) * 2 < WINDOW:  # mostly real code
                seen[window].append((module, i))
    pairs: dict[tuple[str, str, int], list[int]] = defaultdict(list)  # (a, b, offset) → start indices in a
    for places in seen.values():
        for k, (a, i) in enumerate(places):
            for b, j in places[k + 1 :]:
                if a != b or abs(i - j) >= WINDOW:
                    pairs[(a, b, j - i)].append(i)
    found = []
    for (a, b, offset), starts in sorted(pairs.items()):
        for first, last in _runs(sorted(starts)):
            la, lb = lines[a], lines[b]
            found.append(f"{a}:{la[first][0]}-{la[last + WINDOW - 1][0]} ≈ "
                         f"{b}:{lb[first + offset][0]}-{lb[last + offset + WINDOW - 1][0]}")
    return found


def _runs(starts: list[int]) -> list[tuple[int, int]]:
    """Consecutive window starts merged into (first, last) runs: one report per copied region."""
    runs: list[tuple[int, int]] = []
    for s in starts:
        if runs and s == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


def test_shape_ignores_names_and_literals():
    def shapes(source: str) -> list[str]:
        return [shape for _, shape in shape_lines(source)]

    assert shapes("x = foo(a, 'b', 3)  # note\nimport os\n") == ["N = N ( N , S , 0 )"]
    assert shapes("if self.n:\n    return (\n        1\n    )\n") == ["if self . N :", "return (", "0", ")"]
    assert trivial(")") and trivial("} ,") and trivial("return") and trivial("S") and trivial("@ N . N")
    assert not trivial("N = N ( N )") and not trivial("return N") and not trivial("S : { S : True , S : S } ,")


def test_copies_finds_a_renamed_copy_of_nine_lines_and_not_of_eight():
    def function(name: str, steps: int) -> str:  # `def`, the steps, `return`: steps + 2 lines
        body = "".join(f"    {name}{i} = f({name}{i - 1}, {i})  # step\n" for i in range(1, steps + 1))
        return f"def {name}(x):\n{body}    return {name}{steps}\n"

    assert copies({"a.py": function("v", 8), "b.py": "\n\n" + function("w", 8)}) == ["a.py:1-10 ≈ b.py:3-12"]
    assert copies({"a.py": function("v", 7), "b.py": function("w", 7)}) == ["a.py:1-9 ≈ b.py:1-9"]
    assert copies({"a.py": function("v", 6), "b.py": function("w", 6)}) == []
    nested = "x = [\n" + "    [\n        [\n            y\n        ],\n    ],\n" * 2 + "]\n"  # mostly brackets
    assert copies({"a.py": nested, "b.py": nested}) == []


def test_no_copied_blocks():
    found = copies({where(m): path.read_text() for m, path in MODULES.items()})
    assert not found, f"{len(found)} blocks of more than {WINDOW - 1} lines of the same shape:\n" + "\n".join(found)
