"""`marche serve --ray` sizing and config, without starting Ray: how many engine replicas and
threads a machine gets, the packaged config, a missing config in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from service.ray_serve.run import default_config, load_config, size_deployments  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def packaged_options() -> dict:
    (app,) = load_config(default_config())["applications"]
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}


def test_the_default_config_ships_with_the_package_and_autoscales_the_engine():
    assert default_config().is_file()
    assert (ROOT / "deploy" / "serve_config.yaml").resolve() == default_config().resolve()
    engine = packaged_options()["MarcheEngine"]
    policy = engine["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "service.ray_serve.autoscaling:WorkPolicy"
    assert "num_replicas" not in engine and engine["ray_actor_options"] == {"num_gpus": 1}


def test_on_a_gpu_node_the_engine_autoscales_up_to_every_gpu_starting_with_all():
    options, env = size_deployments(packaged_options(), replicas=None, gpus=4, cores=64)
    scaling = options["MarcheEngine"]["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (
        1, 4, 4,
    )  # fmt: skip
    assert options["MarcheEngine"]["ray_actor_options"]["num_gpus"] == 1 and env == {}
    nine, _ = size_deployments(packaged_options(), replicas=None, gpus=9, cores=64)
    assert nine["MarcheEngine"]["autoscaling_config"]["max_replicas"] == 8  # the config's cap


def test_replicas_fixes_the_count_and_turns_autoscaling_off():
    options, _ = size_deployments(packaged_options(), replicas=3, gpus=8, cores=64)
    assert options["MarcheEngine"]["num_replicas"] == 3
    assert "autoscaling_config" not in options["MarcheEngine"]


def test_on_cpu_the_replicas_split_the_cores():
    options, env = size_deployments(packaged_options(), replicas=2, gpus=0, cores=8)
    actor = options["MarcheEngine"]["ray_actor_options"]
    assert actor == {"num_gpus": 0, "num_cpus": 4} and env == {"MARCHE_TORCH_THREADS": "4"}
    assert options["Ingress"]["ray_actor_options"]["num_cpus"] == 0
    one, env = size_deployments(packaged_options(), replicas=None, gpus=0, cores=2)
    assert one["MarcheEngine"]["autoscaling_config"]["max_replicas"] == 1
    assert env == {"MARCHE_TORCH_THREADS": "2"}
    assert packaged_options()["MarcheEngine"]["ray_actor_options"] == {"num_gpus": 1}  # a copy


def test_a_missing_config_is_one_clear_line_from_any_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "marche", "serve", "--ray", "--config", "nope.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == "marche serve --ray: no Serve config at nope.yaml"


def test_a_foreign_config_is_refused(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("applications:\n  - name: x\n    import_path: somewhere.else:app\n")
    with pytest.raises(SystemExit, match="runs one application"):
        load_config(other)


@pytest.mark.slow
def test_the_wheel_carries_the_serve_config(tmp_path):
    """An installed (non-editable) package finds its config: the wheel has it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("marche_serve-*.whl")
    assert "service/ray_serve/serve_config.yaml" in zipfile.ZipFile(wheel).namelist()
