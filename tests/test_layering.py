"""The engine imports and runs without the serving stack; service/'s layers import one way
(core -> http -> ray_serve) with no cycle; in the product, Ray lives in service/ray_serve/
only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK_SERVING_STACK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'ray', 'fastapi', 'starlette', 'prometheus_client', 'uvicorn',
                                  'pydantic', 'service'}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import engine.pipeline, engine.decode.sampler, engine.decode.policy
import engine.model.mar, engine.model.vae, engine.eval.bench
print('ok')
"""


def test_engine_imports_without_serving_stack():
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_SERVING_STACK], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_engine_never_imports_service_or_ray():
    forbidden = {"ray", "service", "fastapi", "starlette", "prometheus_client", "uvicorn"}
    for path in (ROOT / "engine").rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if len(words) >= 2 and words[0] in ("import", "from"):
                top = words[1].split(".")[0]
                assert top not in forbidden, f"{path.name} imports {words[1]}"


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute imports; TYPE_CHECKING blocks included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# service/'s layers, lowest first: a module may import its own layer and those below it
LAYERS = {"service.settings": 0, "service.metrics": 0, "service.core": 1, "service.http": 2,
          "service.ray_serve": 3}  # fmt: skip


def layer(module: str) -> int | None:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


SERVICE = {module_name(p): p for p in (ROOT / "service").rglob("*.py")}


def test_every_service_module_has_a_layer():
    assert {m for m in SERVICE if m != "service" and layer(m) is None} == set()


def test_service_layers_import_one_way():
    for name, path in SERVICE.items():
        for target in imports(path):
            if target.startswith("service.") and name != "service":
                assert layer(target) <= layer(name), (
                    f"{name} (layer {layer(name)}) imports {target}"
                )


def test_service_has_no_import_cycle():
    graph = {
        name: {t for t in imports(path) if t in SERVICE and t != name}
        for name, path in SERVICE.items()
    }
    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, " -> ".join((*stack, node))
        if node in done:
            return
        for nxt in graph[node]:
            visit(nxt, (*stack, node))
        done.add(node)

    for name in graph:
        visit(name, ())


def test_ray_is_imported_only_in_the_ray_runtime():
    """The product (engine, service, marche, scripts); the harnesses that build Ray clusters to
    test or measure it (tests/, loadtest/scale_bench.py) may import Ray too."""
    users = {
        p.relative_to(ROOT)
        for package in ("engine", "service", "marche", "scripts")
        for p in (ROOT / package).rglob("*.py")
        if any(t == "ray" or t.startswith("ray.") for t in imports(p))
    }
    assert {p for p in users if p.parts[:2] != ("service", "ray_serve")} == set()


def test_decode_passes_and_units_are_mirrored_twins():
    """Every eager pass (engine/decode/passes/X.py) has its units in units/X.py, file for file
    (units/ adds only build.py: building and the auto measurement); passes never import
    units (the step engine chooses between them)."""
    decode = ROOT / "engine" / "decode"
    passes = {p.name for p in (decode / "passes").glob("*.py")}
    units = {p.name for p in (decode / "units").glob("*.py")}
    assert passes == units - {"build.py"}, (passes, units)
    for path in (decode / "passes").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("engine.decode.units"), (path, node.module)
