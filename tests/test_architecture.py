"""The layering docs/architecture.md describes: every import inside segtrain runs down (or across)
these layers, never up. A new module must be placed in a layer here."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segtrain"

# Bottom first. A module may import modules of its own layer or of a layer below.
LAYERS = [
    # facts and plain helpers: import nothing of segtrain (but errors)
    ["errors", "task", "metrics", "cache", "host_memory", "datasets.sample_cache"],
    # mechanics that know no config
    ["registry", "devices", "transforms", "inference", "checkpoint", "visualize", "losses.target", "run_lock", "schedules"],
    # the registered parts and the loaders' pieces
    [
        "losses.base", "losses.build", "losses.classification", "losses.combined", "losses.dice", "losses.focal",
        "losses.regression", "losses", "models.unet", "models.torchvision_models", "models.smp_models", "models",
        "datasets.folder", "datasets.shapes", "datasets.torchvision_sets", "datasets", "distributed", "batches", "",
    ],
    # config -> objects
    ["audit", "build"],
    # training and its record
    ["trainer", "overrides", "run_log", "sweep"],
    # the modes
    ["predict", "export", "run"],
]
LAYER = {module: index for index, modules in enumerate(LAYERS) for module in modules}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    return name.removesuffix("__init__").rstrip(".")


def imported(tree: ast.Module) -> set[str]:
    """segtrain modules imported anywhere in the file (inside functions too), except under TYPE_CHECKING."""
    names: set[str] = set()
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for node in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "segtrain":
            base = node.module.removeprefix("segtrain").lstrip(".")
            for alias in node.names:  # `from segtrain import visualize` imports a module
                candidate = f"{base}.{alias.name}".lstrip(".")
                names.add(candidate if candidate in LAYER else base)
        elif isinstance(node, ast.Import):
            names.update(alias.name.removeprefix("segtrain").lstrip(".") for alias in node.names if alias.name.split(".")[0] == "segtrain")
    return names


def test_every_module_has_a_layer():
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    assert modules - set(LAYER) == set(), "place new modules in a layer of tests/test_architecture.py"
    assert set(LAYER) - modules == set(), "a layer names a module that no longer exists"


def test_imports_never_run_up_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for target in imported(ast.parse(path.read_text())):
            if target != module and LAYER[target] > LAYER[module]:
                upward.append(f"{module} (layer {LAYER[module]}) imports {target} (layer {LAYER[target]})")
    assert upward == []


def test_the_check_sees_an_upward_import():
    tree = ast.parse("from segtrain.run import main\nfrom segtrain import visualize\n")
    assert imported(tree) == {"run", "visualize"}
