"""The package's import structure: no import circle, and no module importing from a layer above its own.

Read from the source with ``ast`` (every ``import`` and ``from … import`` of attnbound's own modules, at any
depth of the file, lazy imports included), so the check needs nothing but the tree.
"""

import ast
import pathlib

import attnbound

ROOT = pathlib.Path(attnbound.__file__).resolve().parent

# bottom to top (a module may import from its own layer and the ones below)
LAYERS = [
    {"validation", "certificate", "stats", "numerics", "centring", "eager", "engines", "families"},
    {"planner"},
    {"run", "pipeline", "gradient"},
    {"api"},
    {"calibration", "decoding", "distributed", "nn", "measure"},
    {"integrations", "hardness"},
    {"experiments"},
    {"cli"},
]


def _module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["attnbound", *parts])


def _imports() -> dict[str, set[str]]:
    raw: dict[str, list[tuple[str, list[str]]]] = {}  # module -> (imported module, names taken from it)
    for path in ROOT.rglob("*.py"):
        mod = _module_of(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found.append((target, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found += [(a.name, []) for a in node.names]
        raw[mod] = [(t, names) for t, names in found if t.startswith("attnbound")]
    known = set(raw)
    graph = {}
    for mod, found in raw.items():
        targets = set()
        for target, names in found:
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            # `from pkg import sub` depends on the submodule; `from mod import name` on the module
            targets.update(subs if subs and len(subs) == len(names) else subs + [target])
        graph[mod] = {t if t in known else t.rsplit(".", 1)[0] for t in targets} - {mod}
    return graph


def _layer(mod: str) -> int:
    top = mod.split(".")[1] if mod.count(".") else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{mod} is in no layer: add it to LAYERS")


def test_every_module_is_placed_in_a_layer():
    for mod in _imports():
        if mod != "attnbound":
            _layer(mod)


def test_no_import_circle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if not state.get(t):
                visit(t, path + [t])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [m])


def test_no_module_imports_from_a_layer_above_its_own():
    graph = _imports()
    up = [(m, t) for m, ts in graph.items() if m != "attnbound" for t in ts
          if t != "attnbound" and _layer(t) > _layer(m)]
    assert not up, up


def test_the_checks_can_fail():
    """A planted upward import and a planted circle are seen."""
    graph = _imports()
    assert "attnbound.engines.fused" in graph["attnbound.engines.features"]  # the reading sees real imports
    assert _layer("attnbound.api") > _layer("attnbound.planner")  # so planner -> api would be reported
    assert "attnbound.api" not in graph["attnbound.planner"] and "attnbound.api" in graph["attnbound.calibration"]
