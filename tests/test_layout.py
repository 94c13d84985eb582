"""The house rules, checked on the source: which side may import what, and no import cycles.

Every `import` statement counts, lazy ones inside functions too. The rules (CONTRIBUTING.md):
the trainer's side (reading/) never needs the server stack or a model; the buffer (shm/) and the leaves
import neither side; only cluster/ imports Ray; nothing imports in a circle.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "actdata"
ENTRIES = {"actdata.serve", "actdata.client", "actdata.store"}  # `python -m` names kept for users
LEAVES = {"actdata.config", "actdata.wire", "actdata.stats", "actdata.host", "actdata.auth"}
SERVER_STACK = {"litserve", "fastapi", "starlette", "uvicorn", "hydra", "omegaconf", "prometheus_client",
                "transformers", "datasets", "tokenizers", "accelerate", "gguf", "ray"}


def module_name(path: pathlib.Path) -> str:
    parts = ["actdata", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str, source: str = None) -> set[str]:
    """Absolute names of everything module `name` imports, anywhere in its body."""
    path = MODULES.get(name, ROOT / "x.py")
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return out


def internal(name: str) -> set[str]:
    return {m for m in imports(name) if m in MODULES}


def external(name: str) -> set[str]:
    return {m.split(".")[0] for m in imports(name) if not m.startswith("actdata")}


def side(name: str) -> str:
    if name == "actdata":
        return "facade"  # the public surface: leaves and the trainer's side, imported lazily
    if name in ENTRIES:
        return "entry"
    package = MODULES[name].name == "__init__.py"
    return "leaf" if name in LEAVES or (name.count(".") == 1 and not package) else name.split(".")[1]


def in_side(name: str, *sides: str) -> bool:
    return side(name) in sides


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_side_imports_only_what_it_may(name):
    mine, ext = internal(name), external(name)
    s = side(name)
    if s == "facade":
        assert {m for m in mine if not in_side(m, "leaf", "shm", "reading")} == set()
        assert ext & SERVER_STACK == set()
    elif s == "reading":
        assert {m for m in mine if not in_side(m, "leaf", "shm", "reading")} == set()
        allowed_ext = {"lightning", "pytorch_lightning"} if name == "actdata.reading.datamodule" else set()
        assert (ext & (SERVER_STACK | {"lightning", "pytorch_lightning"})) - allowed_ext == set()
    elif s == "shm":
        assert {m for m in mine if not in_side(m, "leaf", "shm")} == set()
        assert ext & SERVER_STACK == set()
    elif s == "leaf":  # the config's memory estimate counts the buffer's index arrays
        assert {m for m in mine if not in_side(m, "leaf")} - {"actdata.shm.layout"} == set()
        hydra = {"hydra", "omegaconf"} if name == "actdata.config" else set()  # the schema registers itself
        assert ext & SERVER_STACK - hydra == set()
    elif s == "generation":
        assert {m for m in mine if in_side(m, "serving", "reading", "cluster")} == set()
    elif s == "storage":
        assert {m for m in mine if in_side(m, "generation", "serving")} == set()
    if s != "cluster":
        assert "ray" not in ext
    if name != "actdata.reading.datamodule":
        assert not ext & {"lightning", "pytorch_lightning"}


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import edge between actdata's modules."""
    graph = {m: internal(m) for m in MODULES}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                cycles.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    assert cycles == []


def test_the_rules_see_lazy_and_relative_imports():
    source = "def f():\n    from ..serving import app\n    from .. import wire\n    import litserve.server\n"
    assert imports("actdata.reading.x", source) == {"actdata.serving.app", "actdata.wire", "litserve.server"}


def test_no_module_is_past_the_size_the_house_allows():
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert {n: k for n, k in long.items() if k > 520} == {}
