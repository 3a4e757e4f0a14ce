"""The layout of the remote-code modules: imports form no cycle, and every cache step the decoder
is given follows its `cache=` protocol."""

from __future__ import annotations

import ast

from bagel_remote.contexts_bagel import CacheStep, KVCacheStep
from bagel_remote.decoding_bagel import DecodeCache
from bagel_remote.parallel_bagel import UlyssesShard
from conftest import REPO_ROOT


def _relative_imports() -> dict[str, set[str]]:
    """Root module -> the root modules it imports relatively, anywhere in it (inside functions too)."""
    graph = {}
    for file in REPO_ROOT.glob("*.py"):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        graph[file.stem] = {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        }
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    done, path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            found = visit(dep)
            if found:
                return found
        path.pop()
        done.add(module)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_no_module_imports_one_that_imports_it_back():
    graph = _relative_imports()
    assert {"generation_bagel", "parallel_bagel", "contexts_bagel", "layers_bagel"} <= set(graph)
    assert _cycle(graph) is None
    assert (
        _cycle({**graph, "contexts_bagel": graph["contexts_bagel"] | {"generation_bagel"}}) is not None
    )  # it finds one
    # Parallel generation takes what it needs from the modules below the API, not from the API.
    assert "generation_bagel" not in graph["parallel_bagel"] and "parallel_bagel" in graph["generation_bagel"]


def test_cache_steps_follow_the_decoders_protocol():
    for step in (CacheStep, DecodeCache, UlyssesShard):
        assert issubclass(step, KVCacheStep), step
    assert not issubclass(dict, KVCacheStep)
