"""docker-compose.yml cannot run here (no Docker engine), so it is kept correct by
construction: every service it needs exists, and every numbering command it runs is one
the CLI accepts, with options the CLI knows."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click
import yaml

from numbering.cli import main

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def numbering_commands(service: dict[str, Any]) -> list[list[str]]:
    """The numbering command lines a service runs (entrypoint `numbering`, or a shell
    line of `numbering ...` commands joined by &&)."""
    command = service.get("command", [])
    if service.get("entrypoint") == ["sh", "-c"]:
        return [shlex.split(part) for part in " ".join(command).split("&&")]
    if "entrypoint" in service:  # another program (the example web app)
        return []
    return [["numbering", *command]] if command else []


def assert_cli_accepts(argv: list[str]) -> None:
    """Parse ``argv`` as the CLI would (unknown commands, options or bad values raise)."""
    assert argv[0] == "numbering", argv
    command: click.Command = main
    name, args = "numbering", argv[1:]
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"no command {name!r} in {argv}"
        command = sub
    command.make_context(name, list(args))  # parses; does not run the command


def test_services_and_health_checks() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "init", "worker-invoices", "worker-credit-notes", "flower"} <= set(
        services
    )
    assert "--appendonly" in services["redis"]["command"]
    assert "noeviction" in services["redis"]["command"]
    for name in ("postgres", "redis"):
        assert "test" in services[name]["healthcheck"]
    for name in ("worker-invoices", "worker-credit-notes"):
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
        assert services[name]["restart"] == "unless-stopped"
    assert (ROOT / services["init"]["build"] / "Dockerfile").exists()


def test_every_numbering_command_in_the_stack_is_a_real_one() -> None:
    services = compose()["services"]
    commands = [
        argv
        for service in services.values()
        if service.get("image", "").startswith("numbering")
        for argv in numbering_commands(service)
    ]
    health = services["worker-invoices"]["healthcheck"]["test"][1:]
    commands.append(health)
    assert len(commands) >= 6
    for argv in commands:
        assert_cli_accepts(argv)


def test_the_worker_sequences_are_created_by_init() -> None:
    services = compose()["services"]
    created = {
        argv[3]
        for argv in numbering_commands(services["init"])
        if argv[1:3] == ["sequence", "create"]
    }
    served = {services[name]["command"][2] for name in services if name.startswith("worker-")}
    assert served == created == {"invoices", "credit-notes"}


def test_the_web_service_runs_the_example_app() -> None:
    web = compose()["services"]["web"]
    assert web["entrypoint"] == ["uvicorn"]
    module, _, attribute = web["command"][0].partition(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.exists()
    assert f"\n{attribute} = FastAPI(" in path.read_text()
