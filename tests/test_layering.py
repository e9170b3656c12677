"""The engine imports and runs without the serving stack; Ray lives in one module only."""

from __future__ import annotations

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


def test_ray_is_imported_in_at_most_one_module():
    users = [
        p
        for p in ROOT.rglob("*.py")
        if ".venv" not in p.parts
        and p.name != "test_layering.py"
        and any(line.strip().startswith(("import ray", "from ray")) for line in p.open())
    ]
    assert len(users) <= 1, users
