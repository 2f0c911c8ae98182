"""The package's one-way structure (docs/architecture.md): no import circles among the library modules,
the library never imports the CLI nor reads the workspace (vsa.toml) or environment defaults."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "vsa"
TOOLS = {"vsa.__main__", "vsa.completions"}  # entry points that read the CLI tree, not library modules


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every vsa module ``path`` imports, at the top or inside a function."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vsa":
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "vsa"]
        deps.update(n for n in names if n in known)
    return deps


def test_no_import_circles_in_the_library():
    mods = _modules()
    known = set(mods)
    lib = {m: {d for d in _imports(p, known) if not d.startswith("vsa.cli") and d not in TOOLS and d not in ("vsa", m)}
           for m, p in mods.items() if not m.startswith("vsa.cli") and m not in TOOLS}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(u: str, path: list[str]) -> bool:
        state[u] = 1
        for v in sorted(lib.get(u, ())):
            if state.get(v) == 1:
                cycle.extend(path[path.index(v):] + [v])
                return True
            if v not in state and visit(v, path + [v]):
                return True
        state[u] = 2
        return False

    for m in sorted(lib):
        if m not in state and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_library_never_reads_the_workspace():
    mods = _modules()
    offenders = []
    for m, p in mods.items():
        if m.startswith("vsa.cli") or m in TOOLS:
            continue
        deps = _imports(p, set(mods))
        if any(d.startswith("vsa.cli") for d in deps):
            offenders.append(f"{m} imports the CLI")
        src = p.read_text()
        for needle in ("os.environ", "getenv(", "vsa.toml\")", "tomllib"):
            if needle in src and not (m == "vsa.distributed" and needle == "os.environ"):  # torchrun's RANK/WORLD_SIZE
                offenders.append(f"{m} uses {needle}")
    assert not offenders, offenders


TRAINING = {"vsa.trainer", "vsa.alignment.train", "vsa.generator.train", "vsa.distributed"}
INFERENCE = ["vsa.generator.captioner", "vsa.rerank", "vsa.search", "vsa.alignment.evaluate", "vsa.generator.evaluate", "vsa.evaluate",
             "vsa.alignment.snippets", "vsa.regions", "vsa.features.embed", "vsa.features.featuriser", "vsa.generator.decoding", "vsa.generator.model", "vsa.alignment.model",
             "vsa.pictures", "vsa.retrieval"]


def test_inference_never_imports_training():
    """Captioning, scoring, search, grounding and evaluation reach no training module, at the top of a file or
    inside a function, directly or through another module: a user who only captions never loads the trainers."""
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(p, known) - {m} for m, p in mods.items()}
    for start in INFERENCE:
        seen, todo, via = {start}, [start], {start: None}
        while todo:
            u = todo.pop()
            for v in graph.get(u, ()):
                if v not in seen and not v.startswith("vsa.cli") and v not in TOOLS:
                    seen.add(v)
                    via[v] = u
                    todo.append(v)
        reached = sorted(seen & TRAINING)
        if reached:
            chain, x = [], reached[0]
            while x is not None:
                chain.append(x)
                x = via[x]
            raise AssertionError(f"{start} imports training code: {' <- '.join(chain)}")


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(isinstance(n, ast.Expr) for n in body)


def _levels() -> dict[str, int]:
    """Each library module's level: 0 when it imports no other vsa module, else one more than the highest level
    among the modules it imports (top-level or function-local imports; packages' ``__init__`` counted too)."""
    mods = _modules()
    known = set(mods)
    lib = {m: {d for d in _imports(p, known) if not d.startswith("vsa.cli") and d not in TOOLS and d not in ("vsa", m)}
           for m, p in mods.items() if not m.startswith("vsa.cli") and m not in TOOLS and m != "vsa"}
    lib = {m: d for m, d in lib.items() if not _docstring_only(mods[m])}  # a package's docstring alone: no level
    level: dict[str, int] = {}

    def of(m: str) -> int:
        if m not in level:
            level[m] = 1 + max((of(d) for d in lib.get(m, ()) if d in lib), default=-1)
        return level[m]

    for m in lib:
        of(m)
    return level


def test_the_architecture_pages_level_table_is_the_code_s():
    """docs/architecture.md's "Dependency order" block lists every library module at the level its imports give
    it, so the page cannot drift from the code (regenerate the block with ``python tests/test_architecture.py``)."""
    doc = (PKG.parent / "docs" / "architecture.md").read_text()
    block = doc.split("## Dependency order", 1)[1].split("```", 2)[1].strip("\n")
    assert block == level_block(), "docs/architecture.md's level table differs from the code:\n" + level_block()


def level_block() -> str:
    by: dict[int, list[str]] = {}
    for m, n in _levels().items():
        by.setdefault(n, []).append(m.removeprefix("vsa."))
    return "\n".join(f"{n}  {', '.join(sorted(by[n]))}" for n in sorted(by))


if __name__ == "__main__":
    print(level_block())
