"""docker-compose.yml, Dockerfile and the README's commands, checked without
Docker (none runs here): the services exist and fit together, the worker
scales, every ``p2s-dask`` command parses with the real argument parser,
every Dask address points at the scheduler service, and every variable a
command uses is defined.
"""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from p2s_dask.fronts.cli import build_parser

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
P2S_SERVICES = ("scheduler", "worker", "demo")  # the runtime image
SHELL_VARS = {"HOME", "PATH", "PWD"}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile():
    """The Dockerfile's text and its stages, {name: base image}."""
    text = (ROOT / "Dockerfile").read_text()
    stages = {name: base for base, name in
              re.findall(r"(?im)^FROM\s+(\S+)\s+AS\s+(\S+)", text)}
    return text, stages


def as_list(command):
    """A compose command (string or list) as an argument list."""
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def shell_lines(args):
    """The lines of shell a command runs: a ``sh -c`` script, or the command."""
    if len(args) >= 3 and args[0] in ("sh", "bash") and args[1].startswith("-") \
            and "c" in args[1]:
        return [line.strip() for line in args[2].splitlines() if line.strip()]
    return [shlex.join(args)]


def commands_of(service):
    """Argument lists of everything a service runs (commands of its script)."""
    out = []
    for key in ("entrypoint", "command"):
        if key in service:
            out += [shlex.split(line, comments=True) for line in
                    shell_lines(as_list(service[key]))]
    return [c for c in out if c]


def environment(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def port_of(args, flag, default):
    return int(args[args.index(flag) + 1]) if flag in args else default


def scheduler_address(services):
    (sched,) = [c for c in commands_of(services["scheduler"]) if c[:2] == ["dask", "scheduler"]]
    return f"tcp://scheduler:{port_of(sched, '--port', 8786)}"


def s3_endpoint(services):
    (server,) = commands_of(services["s3"])
    return f"http://s3:{port_of(server, '-p', 5000)}"


def test_services_exist(services):
    assert {"scheduler", "worker", "jupyter", "s3", "demo"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"


def test_worker_scales(services):
    worker = services["worker"]
    # `--scale worker=N` needs N distinct containers: no fixed name, no host port
    assert "container_name" not in worker
    assert "ports" not in worker and "hostname" not in worker
    assert "scheduler" in worker.get("depends_on", [])


def test_scheduler_ports(services):
    (sched,) = commands_of(services["scheduler"])
    assert sched[:2] == ["dask", "scheduler"]
    port = port_of(sched, "--port", 8786)
    dashboard = int(sched[sched.index("--dashboard-address") + 1].rsplit(":", 1)[1])
    assert (port, dashboard) == (8786, 8787)
    published = {str(p).rsplit(":", 1)[-1] for p in services["scheduler"]["ports"]}
    assert {"8786", "8787"} <= published


def test_images_and_builds(services, dockerfile):
    text, stages = dockerfile
    # the scheduler, workers and the demo client must run the same versions
    runtime = [(services[n]["image"], services[n]["build"]) for n in P2S_SERVICES]
    assert all(r == runtime[0] for r in runtime), runtime
    # each image name is built from one target only
    targets = {}
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        assert build["context"] == "." and "dockerfile" not in build, name
        assert build["target"] in stages, f"{name}: no stage {build['target']}"
        assert targets.setdefault(service["image"], build["target"]) == build["target"]
    assert stages["runtime"] == "python:3.11-slim"
    assert re.search(r"(?m)^RUN pip install \.(\s|$)", text)
    assert "bokeh" in text  # the scheduler's dashboard needs it
    assert "jupyterlab" in text and "moto[server]" in text
    for source in re.findall(r"(?m)^COPY\s+(.+?)\s+\S+$", text):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "benchmarks/.cache"} <= set(ignored)


def p2s_commands(lines):
    """Argument lists after ``p2s-dask`` in shell lines (comments dropped)."""
    found = []
    for line in lines:
        args = shlex.split(line, comments=True)
        if "p2s-dask" in args:
            found.append(args[args.index("p2s-dask") + 1:])
    return found


def readme_shell_lines():
    """Lines of the README's bash code blocks, continuations joined."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
        lines += [line.strip().removeprefix("$ ") for line in
                  block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def expand(arg, env):
    """``arg`` with ``$VAR``/``${VAR}`` replaced from ``env`` (compose's ``$$``
    escape already undone by the YAML author's intent: both are accepted)."""
    return re.sub(r"\$\$?\{?(\w+)\}?", lambda m: env[m[1]], arg)


def parse(parser, argv, where):
    """The parsed arguments, or a test failure naming the command."""
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `p2s-dask {shlex.join(argv)}` does not parse")


def test_every_p2s_command_parses(services):
    parser = build_parser()
    checked = 0
    for name, service in services.items():
        env = environment(service)
        for args in commands_of(service):
            if "p2s-dask" not in args:
                continue
            argv = [expand(a, env) for a in args[args.index("p2s-dask") + 1:]]
            ns = parse(parser, argv, name)
            checked += 1
            if getattr(ns, "scheduler", None) is not None:
                assert ns.scheduler == scheduler_address(services), name
            if ns.storage_options:
                endpoint = ns.storage_options.get("client_kwargs", {}).get("endpoint_url")
                assert endpoint in (None, s3_endpoint(services)), name
            on_cluster = getattr(ns, "scheduler", None) or env.get("P2S_DASK_SCHEDULER")
            if ns.command == "denoise" and on_cluster:
                # the workers are other containers: they share no files with
                # the client, only the S3 service (input, output, work store)
                for url in (*ns.paths, ns.tmp_dir or "s3://"):
                    assert url.startswith("s3://"), f"{name}: {url}"
    assert checked >= 2
    for argv in p2s_commands(readme_shell_lines()):
        parse(parser, argv, "README.md")


def test_dask_addresses_point_at_the_scheduler(services):
    address = scheduler_address(services)
    for name, service in services.items():
        for args in commands_of(service):
            if args[:2] == ["dask", "worker"]:
                assert args[2] == address, name
        env = environment(service)
        for var in ("P2S_DASK_SCHEDULER", "DASK_SCHEDULER_ADDRESS"):
            if var in env:
                assert env[var] == address, f"{name}: {var}"


def test_store_settings(services):
    endpoint = s3_endpoint(services)
    for name in (*P2S_SERVICES, "jupyter"):
        env = environment(services[name])
        # every client of the store, workers included, finds it and signs in
        assert env.get("AWS_ENDPOINT_URL") == endpoint, name
        assert env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"), name
    published = {str(p).rsplit(":", 1)[-1] for p in services["s3"]["ports"]}
    assert endpoint.rsplit(":", 1)[1] in published


def test_variables_are_defined(services):
    raw = (ROOT / "docker-compose.yml").read_text()
    # ${VAR} without a default would need the user's .env: give one
    for m in re.finditer(r"(?<!\$)\$\{(\w+)([^}]*)\}", raw):
        assert m[2].startswith((":-", "-")), f"${{{m[1]}}} has no default"
    assert not re.search(r"(?<!\$)\$(\w+)", raw), "use $$VAR for the shell's variables"
    for name, service in services.items():
        env = environment(service)
        for args in commands_of(service):
            for arg in args:
                for var in re.findall(r"\$\$?\{?(\w+)", arg):
                    assert var in env or var in SHELL_VARS, f"{name}: ${var} undefined"


def test_demo_script_is_valid(services):
    demo = services["demo"]
    assert demo.get("profiles"), "the one-shot demo must not start with `up`"
    args = as_list(demo["command"])
    # the shell script parses, and so does each inline Python program
    subprocess.run(["sh", "-n", "-c", args[2]], check=True)
    for line in shell_lines(args):
        argv = shlex.split(line)
        if argv[:2] == ["python", "-c"]:
            compile(argv[2], f"demo: {argv[2][:30]}", "exec")
    conditions = {k: v["condition"] for k, v in demo["depends_on"].items()}
    assert conditions["scheduler"] == conditions["s3"] == "service_healthy"
    for name in ("scheduler", "s3"):
        assert "healthcheck" in services[name]
