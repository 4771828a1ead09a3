"""deploy/: the docker-compose file and the Kubernetes manifest name only options the proxy has (as
flags or environment variables), so that they cannot drift from --help. (They cannot run here: the
same topology runs with local processes in test_failover.py and test_topologies.py.)"""

from __future__ import annotations

from pathlib import Path

import yaml

from proxy.config import ENV_PREFIX, OPTIONS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
FLAGS = {option.flag for option in OPTIONS}
ENVIRONMENT = {option.env for option in OPTIONS}


def _proxy_invocations() -> list[tuple[str, list[str], dict[str, object]]]:
    """(where, arguments, environment) of every proxy container in deploy/."""
    found = []
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        if service.get("build"):
            found.append((f"docker-compose {name}", service["command"], service.get("environment", {})))
    for document in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()):
        if document["kind"] == "Deployment":
            for container in document["spec"]["template"]["spec"]["containers"]:
                environment = {item["name"]: item.get("value") for item in container.get("env", [])}
                found.append((f"kubernetes {container['name']}", container["args"], environment))
    return found


def test_the_recipes_use_only_the_proxys_options() -> None:
    invocations = _proxy_invocations()
    assert len(invocations) == 3
    for where, args, environment in invocations:
        assert args[0] == "serve", where
        for arg in args[1:]:
            assert arg.split("=", 1)[0] in FLAGS, (where, arg)
        for name in environment:
            assert not name.startswith(ENV_PREFIX) or name in ENVIRONMENT, (where, name)
        # Behind PgBouncer in transaction mode the service login goes straight to the server.
        assert any(arg.startswith("--service-upstream=") for arg in args), where
