"""The package's layers point one way: no import cycle among distft's modules, nothing imports the Hydra entry point,
and the per-worker recipe reaches no Ray (so it runs in one process) — read from the source, imports inside
functions included."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distft"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(distft modules this module imports, top-level names of the other packages it imports)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one, else a name from pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "distft":
                while target not in MODULES:  # `import distft.x.y` of a name inside a module
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    internal.add(target)
            else:
                external.add(target.split(".")[0])
    return internal, external


GRAPH = {name: _imports(name)[0] for name in MODULES}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += GRAPH[name]
    return seen


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for nxt in sorted(GRAPH[name]):
            # a submodule importing its own package's __init__ is how Python imports it anyway: not a cycle
            if name.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(MODULES):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_the_walk_sees_the_real_imports():
    # controls, so that an empty graph cannot pass the tests below
    assert {"distft.launch", "distft.compare"} <= GRAPH["distft.train"]
    assert "distft.recipe" in GRAPH["distft.worker"] and "distft.worker" in GRAPH["distft.launch"]
    assert "ray" in _imports("distft.worker")[1]


def test_no_import_cycle_among_distft_modules():
    assert _cycle() is None, " -> ".join(_cycle())


def test_only_python_runs_the_hydra_entry_point():
    assert [name for name, deps in GRAPH.items() if "distft.train" in deps] == []


@pytest.mark.parametrize("entry", ["distft.recipe", "distft.loop"])
def test_the_recipe_reaches_no_ray_and_no_driver_code(entry):
    reached = _reachable(entry)
    with_ray = sorted(name for name in reached if "ray" in _imports(name)[1])
    assert with_ray == [], f"{entry} reaches Ray through {with_ray}"
    assert not reached & {"distft.train", "distft.launch", "distft.compare", "distft.worker", "distft.summary"}


def test_the_ray_setup_hook_loads_no_torch():
    # Ray runs the hook in every process of the job (controller, helper actors, the stop flag): anything heavy it
    # imports is paid once per process before training starts
    reached = _reachable("distft.ray_hooks")
    heavy = {"torch", "transformers", "peft", "deepspeed", "hydra", "omegaconf", "datasets"}
    loads = {name: sorted(_imports(name)[1] & heavy) for name in reached if _imports(name)[1] & heavy}
    assert loads == {}, f"distft.ray_hooks reaches {loads}"
    assert {"distft.preemption", "distft.console"} <= reached  # control: the walk saw the hook's imports
