"""The layout of the remote-code modules: imports form no cycle, what the Hub loads never imports
the training package (nor training the examples), and every cache step the decoder is given
follows its `cache=` protocol."""

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


def _imported(source: str) -> set[str]:
    """Every module a source imports, anywhere in it, as written: `..x` for `from ..x import`, `.`
    + name for `from . import name`, dotted names for absolute imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            dots = "." * node.level
            if node.module:
                found.add(dots + node.module)
            else:
                found |= {dots + alias.name for alias in node.names}
    return found


def _names_training(module: str) -> bool:
    parts = module.lstrip(".").split(".")
    return parts[0] == "training" or parts[:2] == ["bagel_remote", "training"]


def _names_an_example(module: str, examples: set[str]) -> bool:
    return module.lstrip(".").split(".")[0] in examples | {"examples"}


def test_hub_modules_do_not_import_training_nor_training_the_examples():
    root = sorted(REPO_ROOT.glob("*.py"))
    training = sorted((REPO_ROOT / "training").glob("*.py"))
    examples = {file.stem for file in (REPO_ROOT / "examples").glob("*.py")}
    assert {"modeling_bagel.py", "loading_bagel.py"} <= {f.name for f in root} and "finetune" in examples
    assert {"packing.py", "data.py", "config.py", "model.py"} <= {f.name for f in training}
    assert not {"packing_bagel.py", "data_bagel.py"} & {f.name for f in root}  # training code left the root
    for file in root:
        assert not any(map(_names_training, _imported(file.read_text(encoding="utf-8")))), file.name
    for file in training:
        imported = _imported(file.read_text(encoding="utf-8"))
        assert not any(_names_an_example(m, examples) for m in imported), file.name
        # one safetensors reader: training reads weights through state_dict_adapter's
        assert "safetensors" not in {m.lstrip(".").split(".")[0] for m in imported}, file.name
        # root modules relatively, one level up (what the Hub's flat layout and `bagel_remote` both resolve)
        for module in imported:
            if module.startswith(".."):
                assert (REPO_ROOT / f"{module[2:].split('.')[0]}.py").is_file(), (file.name, module)
    # the checks see each way of writing such an import
    for line in ("from .training import model", "from . import training", "import bagel_remote.training.step"):
        assert any(map(_names_training, _imported(line))), line
    for line in ("from finetune import main", "import examples.finetune"):
        assert any(_names_an_example(m, examples) for m in _imported(line)), line
    assert not any(map(_names_training, _imported("from .training_data import x\nimport trainingwheels")))


def test_cache_steps_follow_the_decoders_protocol():
    for step in (CacheStep, DecodeCache, UlyssesShard):
        assert issubclass(step, KVCacheStep), step
    assert not issubclass(dict, KVCacheStep)


def _reached(graph: dict[str, set[str]], module: str) -> set[str]:
    reached, pending = set(), [module]
    while pending:
        for dep in graph.get(pending.pop(), ()):
            if dep not in reached:
                reached.add(dep)
                pending.append(dep)
    return reached - {module}


def test_each_auto_map_file_imports_everything_it_reaches_itself():
    """transformers before 5.15 copies a local directory's remote code only one relative import deep
    from the file auto_map names (the Hub path follows imports all the way): each such file must
    import, itself, every module it reaches. (Checked by hand against transformers 5.0.0, where a
    module missing here fails `AutoModel.from_pretrained(local_dir, trust_remote_code=True)`.)"""
    import json

    graph = _relative_imports()
    auto_map = json.loads((REPO_ROOT / "config.json").read_text())["auto_map"]
    entries = {target.split(".")[0] for target in auto_map.values()}
    assert entries == {"configuration_bagel", "modeling_bagel", "processing_bagel"}
    for entry in sorted(entries):
        assert _reached(graph, entry) <= graph[entry], (entry, sorted(_reached(graph, entry) - graph[entry]))
    # the check sees a module reached only through another
    assert not _reached({"a": {"b"}, "b": {"c"}}, "a") <= {"b"}
