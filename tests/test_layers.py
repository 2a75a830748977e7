"""The layering is a checked contract: llama/, kernels/ and losses/ import nothing of the project above them,
data/ never imports train/, the trainer (train/) never the jobs or the driver, the jobs never the driver, and
no project module imports itself back through others. Every import
counts, those inside functions too (a lazy import is still a dependency). And a file of the packages is
one you can read in one sitting: at most MAX_LINES lines of Python."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "llama_posttrain"
PACKAGES = ("llama", "kernels", "losses", "data", "train", "jobs", "driver")
MAX_LINES = 450  # per file of the packages (issue 19; ../shared/STYLE.md aims under ~400)
ALLOWED = {  # package -> the project packages it may import (besides itself)
    "llama": {"kernels"},
    "kernels": set(),
    "losses": set(),
    "data": {"llama"},
    "train": {"llama", "kernels", "losses", "data"},
    "jobs": {"llama", "kernels", "losses", "data", "train"},
    "driver": {"llama", "kernels", "losses", "data", "train", "jobs"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The project modules a file imports (`from a.b import c` counts a.b, and a.b.c when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        names = [n.removeprefix("llama_posttrain.") for n in names if n.startswith("llama_posttrain.")]
        out |= {n for n in names if n.split(".")[0] in PACKAGES}
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {m: {i for i in imports(p) if i in files and i != m} for m, p in files.items()}


def test_the_graph_is_the_package():
    """The checks below see every package and its imports (a moved package once left them checking nothing)."""
    g = graph()
    assert {m.split(".")[0] for m in g} == set(PACKAGES)
    assert "jobs.configs" in g["driver.stage_jobs"] and "data.loader" in g["train.loop"], sorted(g["train.loop"])
    assert sum(map(len, g.values())) > 200  # the project's imports, not a handful


def test_lower_packages_never_import_higher_ones():
    bad = [
        f"{m} imports {i}"
        for m, deps in graph().items()
        for i in deps
        if i.split(".")[0] != m.split(".")[0] and i.split(".")[0] not in ALLOWED[m.split(".")[0]]
    ]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exporting its modules is not a cycle of the code: drop package -> own module
    g = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in g.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_package_file_is_over_max_lines():
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"over {MAX_LINES} lines, split along the file's seams: " + "; ".join(long)
