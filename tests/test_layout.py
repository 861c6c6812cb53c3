"""The package's shape: imports go one way (no cycles, function-level imports included), no module
takes another's private names, nothing of bge_ray is imported inside a function, and no function
grows past a screen."""

from __future__ import annotations

import ast
import os
import re

import pytest

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "bge_ray")
# Third-party modules a function may import: optional extras, and what only one rare path needs.
LAZY_OK = {"optuna", "ray.tune.search.optuna", "matplotlib", "matplotlib.pyplot", "torch", "wandb", "mlflow"}
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()
# Parsed once, at collection, before any test starts Ray: CPython 3.11's AST conversion keeps one
# recursion counter per interpreter, and a parse racing another thread's parse raises
# "SystemError: AST constructor recursion depth mismatch".
TREES = {path: ast.parse(open(path, encoding="utf-8").read(), filename=path) for path in MODULES.values()}


def _resolve(name: str) -> str | None:
    """The package module an import of ``name`` loads (a name imported from a module maps to the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: str) -> list[tuple[str, list[str], bool, int]]:
    """(module, names, inside a function, line) for each import in a file; also every string naming a
    package module (``importlib.import_module("bge_ray....")`` targets count as imports)."""
    tree = TREES[path]
    found: list[tuple[str, list[str], bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, [], in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, [a.name for a in child.names], in_function, child.lineno))
            elif isinstance(child, ast.Constant) and isinstance(child.value, str) and "." in child.value \
                    and child.value in MODULES:
                found.append((child.value, [], False, child.lineno))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                continue  # not imported at run time
            visit(child, nested)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, names, _, _ in _imports(path):
            for target in [_resolve(f"{name}.{n}") for n in names] or [_resolve(name)]:
                if target and target != module and target.startswith("bge_ray"):
                    graph[module].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 30 and graph["bge_ray.train.recipe"]  # the graph is really built
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_names_cross_modules_and_no_package_import_inside_a_function():
    problems = []
    for path in MODULES.values():
        for name, names, in_function, line in _imports(path):
            where = f"{os.path.relpath(path, REPO)}:{line}"
            if name.startswith("bge_ray"):
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                if private:
                    problems.append(f"{where} imports private {private} from {name}")
                if in_function:
                    problems.append(f"{where} imports {name} inside a function")
            elif in_function and name not in LAZY_OK:
                problems.append(f"{where} imports {name} inside a function (only optional extras may be)")
    assert not problems, "\n".join(problems)


def _function_lengths() -> list[tuple[str, int]]:
    out = []
    for path in MODULES.values():
        for node in ast.walk(TREES[path]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                if body:
                    lines = body[-1].end_lineno - body[0].lineno + 1
                    out.append((f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name}", lines))
    return out


def test_no_function_is_longer_than_a_screen():
    lengths = _function_lengths()
    assert len(lengths) > 200
    long = [f"{where}: {n} lines" for where, n in lengths if n > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


@pytest.mark.parametrize("module", ["bge_ray.errors", "bge_ray.seeds", "bge_ray.retrieval.metrics"])
def test_leaf_modules_import_nothing_of_the_package(module):
    assert not _graph()[module]


def test_building_blocks_know_only_the_config_vocabulary():
    """The loss, GradCache and search read like the references: tensors in, tensors out."""
    graph = _graph()
    for module in ("bge_ray.model.loss", "bge_ray.model.grad_cache", "bge_ray.retrieval.search"):
        assert graph[module] <= {"bge_ray.config.finetune"}, (module, graph[module])


def test_every_public_entry_point_documents_args_returns_and_raises():
    from bge_ray.model.grad_cache import train_micro_batch
    from bge_ray.model.loss import contrastive_loss
    from bge_ray.retrieval.evaluate import evaluate
    from bge_ray.sweep.run import tune
    from bge_ray.tools.mine import mine
    from bge_ray.tools.score import score
    from bge_ray.train.launch import finetune

    for fn in (finetune, evaluate, tune, mine, score, contrastive_loss, train_micro_batch):
        doc = fn.__doc__ or ""
        for section in ("Args:", "Returns:", "Raises:"):
            assert re.search(rf"^\s*{section}", doc, re.M), f"{fn.__module__}.{fn.__name__} has no {section}"
