"""The package's shape: pipelines modules import each other in one direction, each imports on its own,
pipelines reach envs through its public names only, and the CLI answers a bad run directory in a line."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import marlkit.envs
import marlkit.pipelines

PIPELINES = Path(marlkit.pipelines.__file__).parent


def _modules() -> list[str]:
    return sorted(p.stem for p in PIPELINES.glob("*.py") if p.stem != "__init__")


def _imported_pipelines_modules(path: Path) -> set[str]:
    """Every ``marlkit.pipelines`` module that ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [alias.name for alias in node.names]
            elif node.module and node.module.startswith("marlkit.pipelines"):
                rest = node.module.removeprefix("marlkit.pipelines").lstrip(".")
                names = [rest] if rest else [alias.name for alias in node.names]
            else:
                continue
            found.update(name.split(".")[0] for name in names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[2] for alias in node.names
                         if alias.name.startswith("marlkit.pipelines."))
    return found & set(_modules())


def test_pipelines_imports_form_no_cycle():
    graph = {name: _imported_pipelines_modules(PIPELINES / f"{name}.py") - {name} for name in _modules()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            assert state.get(other) != "open", f"import cycle: {' -> '.join([*path, name, other])}"
            if other not in state:
                visit(other, [*path, name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_cycle_check_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from .runs import load_run\n    from marlkit.pipelines.session import Run\n")
    assert _imported_pipelines_modules(module) == {"runs", "session"}


def test_every_pipelines_module_imports_first_in_any_order():
    names = _modules()
    random.Random(0).shuffle(names)
    # One interpreter: before each import every marlkit.pipelines module is forgotten, so each module
    # is imported first (torch and the rest stay loaded, which keeps this fast); then all, shuffled.
    code = (
        "import importlib, sys\n"
        f"names = {names!r}\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('marlkit.pipelines')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module('marlkit.pipelines.' + name)\n"
        "for name in reversed(names):\n"
        "    importlib.import_module('marlkit.pipelines.' + name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_pipelines_use_only_the_public_names_of_envs():
    public = set(marlkit.envs.__all__)
    for path in PIPELINES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("marlkit.envs"):
                assert node.module == "marlkit.envs", f"{path.name} imports {node.module}"
                assert {alias.name for alias in node.names} <= public, f"{path.name}: {[a.name for a in node.names]}"


def test_train_into_an_existing_run_is_one_line(tmp_path, tiny_config):
    from marlkit.pipelines.mappo import train

    train(tiny_config("mappo", "matrix/coordination", tmp_path / "run", frames_per_batch=20))
    args = ["train", "mappo", "--env", "matrix/coordination", "--run-dir", str(tmp_path / "run"), "--frames", "40",
            "env.num_envs=4", "collector.frames_per_batch=20", "train.minibatch_size=10"]
    out = subprocess.run([sys.executable, "-m", "marlkit.pipelines.cli", *args], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"marlkit train: error: {tmp_path / 'run'} already holds a run (config.yaml / metrics.csv); choose another "
        "--run-dir so the existing results are kept, or continue it with --resume"]
