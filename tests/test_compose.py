"""compose.yaml works on the first `docker compose up`, as far as a machine without Docker can
tell: every command is a real `mindx` command whose flags parse, the one-shot steps (users,
models, streams) run before the services that need them, ports are loopback-only, NATS runs
with the roles' auth and each service with its role's seed, and the build leaves out .venv.
The `cluster` profile (cluster.env) runs three clustered nats-servers and points every service
at all three with 3 stream replicas."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from services import cli
from shared.nats_auth import CONFIG_FILE, ROLES, SEED_SUFFIX
from shared.nats_client import server_urls
from shared.settings import Settings

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
ONE_SHOT = {"auth", "models", "init"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())  # merges the `<<:` anchors


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${NAME:-default}` substitution, with `env` as the shell's environment."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or (m[2] or ""), value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def env_file(name: str) -> dict[str, str]:
    lines = (REPO / name).read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln.strip() and not ln.startswith("#"))


def mindx_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("command", [""])[0] == "mindx"}


def test_every_mindx_command_exists_and_its_flags_parse(compose: dict[str, Any]) -> None:
    services = mindx_services(compose)
    components = ("collector", "trainer", "validator", "config-updater", "forgetter", "lora-worker")
    assert set(components) <= set(services)
    for name, service in services.items():
        try:
            cli.build_parser().parse_args(service["command"][1:])
        except SystemExit as exc:
            raise AssertionError(f"{name}: {service['command']} does not parse") from exc


def test_ports_are_bound_to_loopback(compose: dict[str, Any]) -> None:
    ports = [(n, p) for n, s in compose["services"].items() for p in s.get("ports", [])]
    assert ports, "nats and ollama publish their ports"
    for name, port in ports:
        assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is reachable from anywhere"


def test_nats_and_ollama_have_healthchecks_and_restart(compose: dict[str, Any]) -> None:
    for name in ("nats", "ollama"):
        service = compose["services"][name]
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service["restart"] in ("unless-stopped", "always"), name


def test_one_shot_steps_run_before_what_needs_them(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def after(name: str, step: str, condition: str) -> None:
        depends = services[name].get("depends_on", {})
        assert depends.get(step, {}).get("condition") == condition, f"{name} after {step}"

    for step in ONE_SHOT:
        assert services[step]["restart"] == "no", step
    after("nats", "auth", "service_completed_successfully")
    after("init", "nats", "service_healthy")
    after("models", "ollama", "service_healthy")
    for name in ("collector", "trainer", "validator", "config-updater", "forgetter", "lora-worker"):
        after(name, "init", "service_completed_successfully")
        after(name, "models", "service_completed_successfully")
    # the model step pulls the base and the embedding model
    assert services["models"]["command"] == ["mindx", "doctor", "--pull"]
    assert services["init"]["command"] == ["mindx", "init"]
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"


def test_nats_uses_the_roles_auth_and_each_service_its_seed(compose: dict[str, Any]) -> None:
    services = compose["services"]
    auth_dir = services["auth"]["command"][3]
    nats = services["nats"]["command"]
    assert nats[nats.index("-c") + 1] == f"{auth_dir}/{CONFIG_FILE}"
    role = {"validator": "validator", "lora-worker": "lora-worker"}
    for name, service in mindx_services(compose).items():
        if name == "auth":
            continue
        env = interpolate(service["environment"], {})  # no cluster.env: the one server
        assert env["NATS_URL"] == "nats://nats:4222", name
        assert env["MINDX_STREAM_REPLICAS"] == "1", name
        want = role.get(name, "service")
        assert env["NATS_NKEY"] == f"{auth_dir}/{want}{SEED_SUFFIX}", name
        assert want in ROLES
        volume = auth_dir.split("/")[1]
        assert any(v.split(":")[1] == f"/{volume}" for v in service["volumes"]), name


def test_lora_worker_has_its_environment_and_the_models(compose: dict[str, Any]) -> None:
    worker = compose["services"]["lora-worker"]
    env = worker["environment"]
    assert {"NATS_URL", "NATS_NKEY", "OLLAMA_HOST", "OLLAMA_MODELS", "MINDX_DATA_DIR"} <= set(env)
    ollama_volume = compose["services"]["ollama"]["volumes"][0].split(":")[0]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in worker["volumes"]}
    assert env["OLLAMA_MODELS"] == f"{mounted[ollama_volume]}/models"  # Ollama's models dir
    assert env["MINDX_DATA_DIR"].startswith(mounted["mindx-data"])


def test_the_config_is_on_a_volume_the_brain_can_mount(compose: dict[str, Any]) -> None:
    updater = compose["services"]["config-updater"]
    config = updater["environment"]["MINDX_CONFIG"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in updater["volumes"]}
    volume = mounts[str(Path(config).parent)]
    assert compose["volumes"][volume]["name"] == volume  # a fixed name, not per project


def test_the_build_leaves_out_the_virtualenv_and_the_history() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and ".git/" in ignored
    # what the image installs stays in
    assert not {"services/", "shared/", "training/", "pyproject.toml", "README.md"} & set(ignored)


def test_the_auth_step_can_run_on_every_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "nats" / "auth"
    assert cli.main(["auth", "init", str(keys), "--keep-existing"]) == 0
    seeds = {p.name: p.read_bytes() for p in keys.iterdir()}
    assert cli.main(["auth", "init", str(keys), "--keep-existing"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"keeping the keys in {keys}"
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == seeds  # never replaced
    assert cli.main(["auth", "init", str(keys)]) == 2  # without the flag: refused, as before


def test_the_cluster_profile_runs_three_clustered_nodes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = {n: s for n, s in services.items() if "cluster" in s.get("profiles", [])}
    assert sorted(nodes) == ["nats-1", "nats-2", "nats-3"]
    auth_dir = services["auth"]["command"][3]

    def flag(argv: list[str], name: str) -> str:
        return argv[argv.index(name) + 1]

    names, cluster_names, stores = set(), set(), set()
    for name, node in nodes.items():
        argv = node["command"]
        assert "-js" in argv, name
        names.add(flag(argv, "-n"))
        cluster_names.add(flag(argv, "--cluster_name"))
        assert flag(argv, "-c") == f"{auth_dir}/{CONFIG_FILE}", name  # the roles' auth
        port = flag(argv, "--cluster").rsplit(":", 1)[1]
        # routes to the two other nodes, on their cluster port
        others = {f"nats://{n}:{port}" for n in nodes if n != name}
        assert set(flag(argv, "--routes").split(",")) == others, name
        store = next(v for v in node["volumes"] if v.endswith(":" + flag(argv, "-sd")))
        stores.add(store.split(":")[0])
        assert node["healthcheck"]["test"][0] == "CMD", name
        assert node["restart"] == "unless-stopped", name
        assert node["depends_on"]["auth"]["condition"] == "service_completed_successfully"
    assert names == set(nodes) and len(cluster_names) == 1  # one cluster of named nodes
    assert len(stores) == 3 and stores <= set(compose["volumes"])  # a store each
    # streams are declared once every node is up (a meta leader needs them)
    init = services["init"]["depends_on"]
    for name in nodes:
        assert init[name] == {"condition": "service_healthy", "required": False}, name


def test_cluster_env_points_every_service_at_every_node_with_3_replicas(
    compose: dict[str, Any],
) -> None:
    env = env_file("cluster.env")
    assert env["COMPOSE_PROFILES"] == "cluster"
    nodes = {n for n, s in compose["services"].items() if "cluster" in s.get("profiles", [])}
    for name, service in mindx_services(compose).items():
        if name == "auth":
            continue
        service_env = interpolate(service["environment"], env)
        urls = server_urls(service_env["NATS_URL"])
        assert {u.split("//")[1].split(":")[0] for u in urls} == nodes, name
        assert all(u.endswith(":4222") for u in urls), name  # the nodes' client port
        # the settings the service reads: 3 replicas, all three servers
        settings = Settings.load({}, env={k: str(v) for k, v in service_env.items()})
        assert settings.stream_replicas == 3, name
        assert settings.nats is not None and len(server_urls(settings.nats)) == 3, name
