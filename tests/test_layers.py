"""The package's layers, as the README describes them, checked on its source.

core (no rpyc) → serving (no IPython) → client → notebook (only the client API), and wire (what
both ends of the wire share: the typed messages, the codec, transport, side channel, TLS; no
model, no IPython) below serving and client: client → wire ← serving → core. Core knows nothing
of the wire. The notebook reads the wire's typed vocabulary (``wire.messages``, ``wire.calls``:
the replies it renders) and nothing else of it. ``errors``, ``states`` (a run's state),
``conditions`` and ``version`` are shared vocabulary every layer may use. Every import counts,
lazy ones inside functions included; only ``if TYPE_CHECKING:`` blocks (never
executed) are left out of the cycle check.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "djinn_nb"
SHARED = {"djinn_nb.errors", "djinn_nb.states", "djinn_nb.version", "djinn_nb.conditions"}
#: the wire's typed messages (and how they are checked): what the notebook may read of the wire
VOCABULARY = {"djinn_nb.wire", "djinn_nb.wire.messages", "djinn_nb.wire.calls", "djinn_nb.wire.typed"}
ALLOWED = {  # layer → layers it may import: client → wire ← serving → core
    "core": {"core"},
    "wire": {"wire"},
    "serving": {"core", "serving", "wire"},
    "client": {"serving", "client", "wire"},
    "notebook": {"client", "notebook"},
}
FORBIDDEN_THIRD_PARTY = {
    "core": {"rpyc", "IPython", "ipywidgets", "matplotlib", "pandas"},
    "wire": {"transformers", "IPython", "ipywidgets", "matplotlib", "pandas"},
    "serving": {"IPython", "ipywidgets", "matplotlib", "pandas"},
    "client": {"IPython", "ipywidgets", "matplotlib", "pandas"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, executed at run time) for every import in ``path``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, runtime: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.body:
                    visit_stmt(sub, False)
                for sub in child.orelse:
                    visit_stmt(sub, runtime)
                continue
            visit_stmt(child, runtime)

    def visit_stmt(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, runtime) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from ..wire import sidechannel` imports the module djinn_nb.wire.sidechannel, and
            # `from .. import wire` the package djinn_nb.wire, not djinn_nb's own names
            submodules = []
            for a in node.names:
                path = PKG.parent / (mod + "." + a.name).replace(".", "/")
                if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
                    submodules.append(mod + "." + a.name)
            if len(submodules) < len(node.names):
                found.append((mod, runtime))
            found.extend((m, runtime) for m in submodules)
        visit(node, runtime)

    visit(tree, True)
    return found


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in ALLOWED else None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_its_own_layer_and_those_below(module):
    _check_layers(module, MODULES[module])


def _check_layers(module: str, path: Path) -> None:
    layer = _layer(module)
    for target, _ in _imports(path):
        if target == "djinn_nb":
            pytest.fail(f"{module} imports the package's own __init__ (import the module it needs)")
        if module in SHARED and target.startswith("djinn_nb"):
            assert target in SHARED, f"shared module {module} imports {target}"
        if layer is None or not target.startswith("djinn_nb."):
            if layer in FORBIDDEN_THIRD_PARTY:
                assert target.split(".")[0] not in FORBIDDEN_THIRD_PARTY[layer], f"{module} ({layer}) imports {target}"
            continue
        if target in SHARED or (layer == "notebook" and target in VOCABULARY and target != "djinn_nb.wire"):
            continue
        target_layer = _layer(target)
        assert target_layer in ALLOWED[layer], f"{module} ({layer}) imports {target} ({target_layer})"


def test_no_module_is_over_500_lines():
    long = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in long.items() if n > 500} == {}


def test_no_import_cycles_lazy_imports_included():
    graph = {
        m: {t for t, runtime in _imports(p) if runtime and t in MODULES and t != m and not m.startswith(t + ".")}
        for m, p in MODULES.items()
    }
    # a package's __init__ re-exporting its own modules is how packages work, not a cycle
    graph = {m: {t for t in ts if not (t.startswith(m + ".") and MODULES[m].name == "__init__.py")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " → ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_the_checker_sees_a_violation():
    """The layer check itself can fail: a core module importing the client is caught."""
    fake = PKG / "core" / "_layer_probe_tmp.py"
    fake.write_text("def f():\n    from ..client import connect\n")
    try:
        imports = _imports(fake)
    finally:
        fake.unlink()
    assert ("djinn_nb.client", True) in imports
    assert _layer("djinn_nb.client") not in ALLOWED["core"]


def test_core_knows_nothing_of_the_wire():
    """No core or shared module imports the wire, its typed messages included (serving builds a
    run's brief, row and summary from core's fields: serving/run_views.py), nor the old top-level
    paths of those messages (no shims); a probe importing the wire's messages from core is caught."""
    def wire_imports(path: Path) -> list[str]:
        return [t for t, _ in _imports(path) if t == "djinn_nb.wire" or t.startswith("djinn_nb.wire.")]

    core = {m: p for m, p in MODULES.items() if _layer(m) == "core" or m in SHARED}
    assert len(core) > 30 and {m: wire_imports(p) for m, p in core.items() if wire_imports(p)} == {}
    assert not any(m in MODULES for m in ("djinn_nb.schema", "djinn_nb.schema_calls", "djinn_nb.messages"))
    fake = PKG / "core" / "_wire_probe_tmp.py"
    fake.write_text("from ..wire.messages import RunBrief\n")
    try:
        found = wire_imports(fake)
        with pytest.raises(AssertionError, match=r"\(core\) imports djinn_nb.wire.messages \(wire\)"):
            _check_layers("djinn_nb.core._wire_probe_tmp", fake)
    finally:
        fake.unlink()
    assert found == ["djinn_nb.wire.messages"]


def test_no_collaborator_is_a_mixin_of_the_engine():
    """Forks and the navigator are given the engine as a RunHost (core/host.py), not `self: "Engine"`."""
    mixins = [m for m, p in MODULES.items() if 'self: "Engine"' in p.read_text()]
    assert mixins == []
    from djinn_nb.core.engine import Engine
    from djinn_nb.core.host import RunHost

    wanted = [name for name in vars(RunHost) if not name.startswith("_")] + list(RunHost.__annotations__)
    missing = [name for name in wanted if not hasattr(Engine, name) and name not in ("device", "residency", "stepper")]
    assert missing == []


def test_no_call_group_is_a_mixin_of_the_service_or_the_client():
    """The service's call groups and the client's SAE calls are classes given narrow, typed interfaces
    (serving/parts.py; mypy checks that what they are given conforms), not mixins typed
    ``self: ServiceParts``: the service is an rpyc.Service and nothing else, the client and a run
    have no base class, and every call group is given only those interfaces, never the service."""
    import inspect

    import rpyc

    from djinn_nb.client.connection import Client
    from djinn_nb.client.run import Run
    from djinn_nb.serving import parts
    from djinn_nb.serving.service import DjinnService

    typed_self = [m for m, p in MODULES.items() if m.startswith(("djinn_nb.serving", "djinn_nb.client"))
                  and ('self: "' in p.read_text() or "self: Service" in p.read_text())]
    assert typed_self == []
    assert DjinnService.__bases__ == (rpyc.Service,) and Client.__bases__ == (object,) and Run.__bases__ == (object,)
    service = DjinnService(object())  # type: ignore[arg-type]  # the groups only keep what they are given
    found, todo = set(), list(vars(service).values())
    while todo:  # the service's groups, and those they are given
        v = todo.pop()
        if type(v).__module__.startswith("djinn_nb.serving.") and type(v) not in found:
            found.add(type(v))
            todo += vars(v).values()
    groups = found - {DjinnService}
    assert len(groups) == 10, groups  # context, transfers, texts, requests and six groups of calls
    given = set(parts.__all__) | {"ServerState", "Callable[[], bool]", "int"}
    for group in groups:
        for p in list(inspect.signature(group.__init__).parameters.values())[1:]:
            assert p.annotation in given, (group.__name__, p.name, p.annotation)
