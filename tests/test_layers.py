"""The package's shape: one room a layer, imports only downward, no cycles, no side effects at import.

Layers, bottom to top (docs/architecture.md); a module may import its own layer and the layers below:
    0 settings, version
    1 data, datasets, sampler
    2 kernels, nn, module, surgery
    3 train, optim (its optimizer), threads (the training loop's thread tuner), distributed, persist,
      scvi_tools_format, outputs, report
    4 model
    5 cli, demo, and the package's __init__ (the public face)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ["scvi_scale.settings", "scvi_scale.version"],
    ["scvi_scale.data", "scvi_scale.datasets", "scvi_scale.sampler"],
    ["scvi_scale.kernels", "scvi_scale.nn", "scvi_scale.module", "scvi_scale.surgery"],
    [
        "scvi_scale.train",
        "scvi_scale.optim",
        "scvi_scale.threads",
        "scvi_scale.distributed",
        "scvi_scale.persist",
        "scvi_scale.scvi_tools_format",
        "scvi_scale.outputs",
        "scvi_scale.report",
    ],
    ["scvi_scale.model"],
    ["scvi_scale.cli", "scvi_scale.demo", "scvi_scale"],
]


def package_modules() -> dict[str, Path]:
    """Module name -> file, for scvi_scale/ and kernels/ (installed as scvi_scale.kernels)."""
    modules = {}
    for folder, prefix in ((ROOT / "scvi_scale", "scvi_scale"), (ROOT / "kernels", "scvi_scale.kernels")):
        for path in folder.rglob("*.py"):
            parts = [part for part in path.relative_to(folder).with_suffix("").parts if part != "__init__"]
            if parts[-1:] != ["__main__"]:
                modules[".".join([prefix, *parts])] = path
    return modules


def layer_of(module: str) -> int:
    """The layer of the longest prefix of `module` named in LAYERS."""
    best = max(
        (prefix for layer in LAYERS for prefix in layer if module == prefix or module.startswith(prefix + ".")), key=len
    )
    return next(index for index, layer in enumerate(LAYERS) if best in layer)


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `module`'s file imports (anywhere in it, lazily imported ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):  # a package's own parents run first
                found.add(name)
    return found


def test_every_module_has_a_layer():
    assert all(isinstance(layer_of(module), int) for module in package_modules())


def test_imports_go_down_the_layers_and_never_in_a_circle():
    modules = package_modules()
    graph = {module: imports_of(module, path, set(modules)) for module, path in modules.items()}
    upward = [
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, f"imports from a lower layer into a higher one: {upward}"
    # depth-first search for a cycle
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path + [module, target]
            if target not in state and (cycle := visit(target, path + [module])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


CHILD = """
import json, os, sys
import anndata, dask.array, numpy, pandas, scipy.sparse, torch, tqdm, zarr  # third-party: loaded once, shared
results = {}
for module in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a fresh child per module: nothing of scvi_scale is loaded yet
        os.close(read)
        try:
            import importlib
            importlib.import_module(module)
            import torch.optim.optimizer as optimizer
            report = {"loaded": sorted(m for m in sys.modules if m.startswith("scvi_scale")),
                      "optimizer_hooks": len(optimizer._global_optimizer_post_hooks)
                      + len(optimizer._global_optimizer_pre_hooks)}
        except BaseException as error:
            report = {"error": f"{type(error).__name__}: {error}"}
        os.write(write, json.dumps(report).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.waitpid(pid, 0)
    results[module] = json.loads(b"".join(chunks))
print(json.dumps(results))
"""


def test_each_module_imports_alone_loading_only_its_layer_and_below_and_no_global_hooks():
    modules = sorted(package_modules())
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(modules)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    results = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {module: result["error"] for module, result in results.items() if "error" in result}
    assert not failed, f"modules that do not import on their own: {failed}"
    for module, result in results.items():
        above = [
            loaded for loaded in result["loaded"] if loaded != "scvi_scale" and layer_of(loaded) > layer_of(module)
        ]
        assert not above, f"importing {module} loads higher layers: {above}"
        assert result["optimizer_hooks"] == 0, f"importing {module} registers global optimizer hooks"
