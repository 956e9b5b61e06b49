"""Deployment files (deploy/): the compose files, Kubernetes manifests, proxy config and
Dockerfile say what the runbook promises. Parsed, never run (no Docker, no network):
isolation and shared network namespaces, what is published, read-only mounts, the proxy
exposing only the Fleet API, and only real `fedtune-server` / `fedtune-site` commands.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import flatten, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NGINX_CONF = DEPLOY / "proxy" / "nginx.conf"
KUBERNETES = DEPLOY / "kubernetes"
TLS_FILES = {"ca.pem", "server.pem", "server.key"}
PROGRAMS = ("fedtune-server", "fedtune-site")

# Every subcommand and flag the deploy files may use: the commands' documented interface.
# test_the_flag_table_matches_the_real_commands keeps it honest against the parsers.
COMMANDS: dict[str, dict[str, set[str]]] = {
    "fedtune-server": {
        "ca": {"--hosts", "--home", "--name"},
        "start": {"--home", "--host", "--port", "--isolation"},
        "register": {"--name", "--home"},
        "sites": {"--home"},
        "run": {"--config", "--home", "--detach"},
        "resume": {"--home"},
        "runs": {"--home"},
        "export": {"--out", "--round", "--merged", "--force", "--home"},
    },
    "fedtune-site": {
        "keygen": {"--home"},
        "check": {"--data", "--config"},
        "start": {
            "--superlink",
            "--ca",
            "--coordinator-key",
            "--data",
            "--key",
            "--home",
            "--port",
            "--host",
            "--isolation",
            "--config",
            "--allow-identifiers",
            "--name",
        },
        "evaluate": {"--adapter", "--data", "--config", "--group-by", "--out", "--batch-size"},
        "predict": {"--adapter", "--data", "--config", "--out", "--batch-size"},
    },
}
TOP_LEVEL_FLAGS = {"--help", "-h"}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _services(name: str) -> dict[str, dict[str, Any]]:
    return _yaml(DEPLOY / name / "compose.yaml")["services"]


def _value(command: list[str], flag: str, default: str | None = None) -> str:
    if flag not in command:
        assert default is not None, f"{flag} missing from {command}"
        return default
    return str(command[command.index(flag) + 1])


def _namespace_holder(services: dict[str, dict[str, Any]], name: str) -> str:
    """The service whose network namespace `name` runs in."""
    mode = services[name].get("network_mode", "")
    return mode.removeprefix("service:") if mode.startswith("service:") else name


def _mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mounts by container path; compose's long syntax is required so that read_only is
    explicit."""
    mounts = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, dict), f"use the long volume syntax, got {volume!r}"
        mounts[volume["target"]] = volume
    return mounts


# --- Docker Compose: coordinator ---------------------------------------------------------


def test_coordinator_superlink_runs_with_process_isolation_beside_its_superexec() -> None:
    services = _services("coordinator")
    superlink, superexec = services["superlink"]["command"], services["superexec"]["command"]
    assert superlink[:2] == ["fedtune-server", "start"], superlink
    assert _value(superlink, "--isolation") == "process", "the superexec runs the ServerApp"
    assert _value(superlink, "--host") == "0.0.0.0", "the proxy container must reach it"
    port = _value(superlink, "--port")
    assert superexec[0] == "flower-superexec"
    assert _value(superexec, "--runtime-api-address") == f"127.0.0.1:{port}"
    home = _value(superlink, "--home")
    assert _value(superexec, "--root-certificates") == f"{home}/tls/ca.pem"
    assert "--insecure" not in superexec, "the SuperLink's Runtime API speaks TLS only"
    holder = _namespace_holder(services, "superlink")
    assert _namespace_holder(services, "superexec") == holder, (
        "superexec must share the superlink's network namespace to reach 127.0.0.1"
    )


def test_coordinator_home_is_persistent_and_shared_with_the_serverapp() -> None:
    services = _services("coordinator")
    home = _value(services["superlink"]["command"], "--home")
    for name in ("superlink", "superexec"):  # the ServerApp writes HOME/runs in the superexec
        mount = _mounts(services[name]).get(home)
        assert mount, f"{name}: the coordinator's home {home} must be mounted"
        assert mount["type"] in {"bind", "volume"} and not mount.get("read_only"), mount
        assert "${FEDTUNE_HOME:?" in mount["source"], "an unset FEDTUNE_HOME must stop compose"
    assert _mounts(services["superlink"])[home] == _mounts(services["superexec"])[home]


def test_coordinator_only_the_proxy_publishes_a_port() -> None:
    services = _services("coordinator")
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"proxy"}, f"only the proxy may publish a port, got {published}"
    assert services["proxy"]["ports"] == [f"443:{_nginx_listen_port()}"]
    assert not any(service.get("network_mode") == "host" for service in services.values())


def test_coordinator_proxy_reaches_the_superlink_by_the_name_nginx_dials() -> None:
    services = _services("coordinator")
    holder = _namespace_holder(services, "superlink")
    names = {holder}
    for network in (services[holder].get("networks") or {}).values():
        names.update((network or {}).get("aliases", []))
    host, port = _nginx_upstream()
    assert host in names, f"nginx dials {host}, the SuperLink's namespace answers to {names}"
    assert port == _value(services["superlink"]["command"], "--port")


def test_coordinator_proxy_mounts_its_config_and_tls_files_read_only_never_the_ca_key() -> None:
    proxy = _services("coordinator")["proxy"]
    mounts = _mounts(proxy)
    config = mounts["/etc/nginx/nginx.conf"]
    assert config["read_only"] and (DEPLOY / "coordinator" / config["source"]).resolve() == (
        NGINX_CONF
    )
    for name in TLS_FILES:
        mount = mounts[f"/etc/nginx/tls/{name}"]
        assert mount["read_only"], f"{name} must be mounted read-only"
        assert mount["source"].endswith(f"/tls/{name}")
    assert not any("ca.key" in str(m.get("source")) for m in mounts.values())
    assert proxy.get("user") and not proxy["user"].startswith("0"), "nginx runs as non-root"


def test_every_coordinator_service_comes_back_after_a_crash() -> None:
    for name, service in _services("coordinator").items():
        assert service.get("restart") == "unless-stopped", f"{name}: restart policy"


# --- Docker Compose: site ----------------------------------------------------------------


def test_site_supernode_and_superexec_share_a_namespace_and_nothing_is_published() -> None:
    services = _services("site")
    supernode, superexec = services["supernode"]["command"], services["superexec"]["command"]
    assert supernode[:2] == ["fedtune-site", "start"], supernode
    assert _value(supernode, "--isolation") == "process"
    port = _value(supernode, "--port", default="9094")
    assert superexec[0] == "flower-superexec"
    assert _value(superexec, "--runtime-api-address") == f"127.0.0.1:{port}"
    assert _value(supernode, "--host", default="127.0.0.1") == "127.0.0.1", (
        "runtime API stays local"
    )
    assert _namespace_holder(services, "superexec") == _namespace_holder(services, "supernode")
    assert not any(s.get("ports") for s in services.values()), "a site publishes no port"
    assert "${FEDTUNE_SUPERLINK:?" in _value(supernode, "--superlink")


def test_site_data_is_read_only_at_the_same_path_in_both_containers() -> None:
    services = _services("site")
    data = _value(services["supernode"]["command"], "--data")
    for name in ("supernode", "superexec"):
        mount = _mounts(services[name]).get(data)
        assert mount, f"{name}: the records must be mounted at {data}, the --data path"
        assert mount["read_only"] is True, f"{name}: the records must be mounted read-only"
        assert "${FEDTUNE_DATA:?" in mount["source"], "an unset FEDTUNE_DATA must stop compose"
    assert _mounts(services["supernode"])[data] == _mounts(services["superexec"])[data]


def test_site_key_and_ca_are_mounted_read_only_where_start_reads_them() -> None:
    services = _services("site")
    command = services["supernode"]["command"]
    mounts = _mounts(services["supernode"])
    for flag, name in (("--key", "site.key"), ("--ca", "ca.pem")):
        mount = mounts.get(_value(command, flag))
        assert mount and mount["read_only"] is True, f"{flag} must be a read-only mount"
        assert mount["source"].endswith(f"/{name}")
    assert not any(t.endswith(".key") for t in _mounts(services["superexec"])), (
        "the ClientApp's container does not need the site's key"
    )


def test_site_gpu_override_gives_gpus_to_the_containers_that_train() -> None:
    override = _yaml(DEPLOY / "site" / "compose.gpu.yaml")["services"]
    assert set(override) == {"supernode", "superexec"} == set(_services("site")) - {"netns"}
    for name, service in override.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}], name


# --- The proxy -----------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    children: list[Directive] | None = None
    parents: list[str] = field(default_factory=list)


def _nginx(text: str) -> list[Directive]:
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    tokens = re.findall(r"'[^']*'|\"[^\"]*\"|[{};]|[^\s{};]+", text)

    def block(i: int, parents: list[str]) -> tuple[list[Directive], int]:
        out: list[Directive] = []
        words: list[str] = []
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if token == ";":
                out.append(Directive(words[0], words[1:], None, parents))
                words = []
            elif token == "{":
                name = " ".join(words)
                children, i = block(i, [*parents, name])
                out.append(Directive(words[0], words[1:], children, parents))
                words = []
            elif token == "}":
                assert not words, f"nginx.conf: unterminated directive {words}"
                return out, i
            else:
                words.append(token)
        assert not words and not parents, "nginx.conf: unbalanced braces"
        return out, i

    return block(0, [])[0]


def _walk(directives: list[Directive]) -> Iterator[Directive]:
    for d in directives:
        yield d
        yield from _walk(d.children or [])


def _one(directives: list[Directive], name: str) -> Directive:
    found = [d for d in directives if d.name == name]
    assert len(found) == 1, f"nginx.conf: expected one {name}, got {len(found)}"
    return found[0]


def _server() -> Directive:
    http = _one(_nginx(NGINX_CONF.read_text()), "http")
    return _one(http.children or [], "server")


def _locations() -> dict[str, list[Directive]]:
    locations = [d for d in _server().children or [] if d.name == "location"]
    for location in locations:
        assert len(location.args) == 1, f"only prefix locations, got {location.args}"
    return {location.args[0]: location.children or [] for location in locations}


def _nginx_listen_port() -> str:
    listen = _one(_server().children or [], "listen")
    assert "ssl" in listen.args, "the proxy terminates TLS"
    return listen.args[0]


def _nginx_upstream() -> tuple[str, str]:
    """Host and port of the SuperLink as nginx dials it."""
    host, port = _one(_upstream().children or [], "server").args[0].rsplit(":", 1)
    return host, port


def _upstream() -> Directive:
    http = _one(_nginx(NGINX_CONF.read_text()), "http")
    return _one(http.children or [], "upstream")


def _matched(path: str) -> str:
    """The location nginx picks for `path`: the longest matching prefix."""
    return max((p for p in _locations() if path.startswith(p)), key=len)


def _size_mb(size: str) -> float:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", size)
    assert match, f"nginx size {size!r}"
    number, unit = match.groups()
    return int(number) * {"k": 1 / 1024, "m": 1, "g": 1024, "": 1 / 2**20}[unit.lower()]


def test_proxy_exposes_only_the_fleet_api() -> None:
    locations = _locations()
    assert set(locations) == {"/v1/fleet/", "/"}, f"unexpected locations {sorted(locations)}"
    catch_all = {d.name: d.args for d in locations["/"]}
    assert catch_all == {"return": ["404"]}, f"location / must only return 404, got {catch_all}"
    for path in (
        "/v1/control/start-run",
        "/v1/control/list-runs",
        "/v1/runtime/pull-messages",
        "/docs",
        "/openapi.json",
        "/health",
        "/v1/fleetx",
    ):
        assert _matched(path) == "/", f"{path} must get 404"
    assert _matched("/v1/fleet/pull-messages") == "/v1/fleet/"


def test_proxy_forwards_fleet_over_verified_tls_and_nothing_else() -> None:
    fleet = {d.name: d.args for d in _locations()["/v1/fleet/"]}
    host, _ = _nginx_upstream()
    assert fleet["proxy_pass"] == [f"https://{_upstream().args[0]}/v1/fleet/"], (
        "forward the normalised path, and only under /v1/fleet/"
    )
    assert fleet["proxy_ssl_verify"] == ["on"], "the upstream certificate must be verified"
    assert fleet["proxy_ssl_trusted_certificate"] == ["/etc/nginx/tls/ca.pem"]
    assert fleet["proxy_ssl_name"] == [host], "the name the SuperLink certificate covers"
    directives = list(_walk(_nginx(NGINX_CONF.read_text())))
    passes = [d for d in directives if d.name.endswith("_pass")]
    assert [d.name for d in passes] == ["proxy_pass"], "exactly one forwarding directive"
    assert not any("/v1/control" in arg for d in directives for arg in d.args)
    assert _size_mb(_one(_server().children or [], "client_max_body_size").args[0]) >= 16, (
        "adapters travel in 5 MB chunks, the app bundle is up to 10 MB"
    )
    assert int(fleet["proxy_read_timeout"][0].rstrip("s")) >= 300, "rounds take minutes"
    server = {d.name: d.args for d in _server().children or []}
    assert server["ssl_certificate"] == ["/etc/nginx/tls/server.pem"]
    assert server["ssl_certificate_key"] == ["/etc/nginx/tls/server.key"]


def test_certificate_instructions_cover_the_name_the_proxy_dials() -> None:
    host, _ = _nginx_upstream()
    readme = (DEPLOY / "README.md").read_text()
    hosts = re.findall(r"fedtune-server ca --hosts (\S+)", readme)
    assert hosts and all(host in h.split(",") for h in hosts), (
        f"every `fedtune-server ca` in the runbook must include {host} in --hosts: {hosts}"
    )


# --- Kubernetes ----------------------------------------------------------------------------


def _manifests() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def _kustomization() -> dict[str, Any]:
    return _yaml(KUBERNETES / "kustomization.yaml")


def _pod() -> dict[str, Any]:
    return _manifests()["Deployment"]["spec"]["template"]["spec"]


def _containers() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in _pod()["containers"]}


def test_kustomization_applies_every_manifest() -> None:
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(_kustomization()["resources"]) == files


def test_kubernetes_deployment_is_one_pod_replaced_with_recreate() -> None:
    spec = _manifests()["Deployment"]["spec"]
    assert spec["replicas"] == 1, "one SuperLink: its state is SQLite"
    assert spec["strategy"]["type"] == "Recreate", "never two SuperLinks on one volume"
    assert set(_containers()) == {"superlink", "superexec", "proxy"}


def test_kubernetes_superlink_stays_on_loopback_beside_its_superexec() -> None:
    containers = _containers()
    superlink = containers["superlink"]["command"]
    superexec = containers["superexec"]["command"]
    assert superlink[:2] == ["fedtune-server", "start"]
    assert _value(superlink, "--isolation") == "process"
    assert _value(superlink, "--host") == "127.0.0.1", "nothing outside the pod reaches it"
    port = _value(superlink, "--port")
    assert _value(superexec, "--runtime-api-address") == f"127.0.0.1:{port}"
    home = _value(superlink, "--home")
    assert _value(superexec, "--root-certificates") == f"{home}/tls/ca.pem"
    host, nginx_port = _nginx_upstream()
    aliases = {h: a["ip"] for a in _pod()["hostAliases"] for h in a["hostnames"]}
    assert aliases.get(host) == "127.0.0.1" and nginx_port == port, (
        f"nginx dials {host}:{nginx_port}; in the pod that must be the SuperLink on loopback"
    )
    assert containers["superlink"]["readinessProbe"], "the SuperLink needs a readiness probe"


def test_kubernetes_state_volume_holds_the_home_in_both_fedtune_containers() -> None:
    containers = _containers()
    home = _value(containers["superlink"]["command"], "--home")
    claims = {v["name"]: v for v in _pod()["volumes"] if "persistentVolumeClaim" in v}
    assert len(claims) == 1
    (claim,) = claims
    assert (
        _manifests()["PersistentVolumeClaim"]["metadata"]["name"]
        == claims[claim]["persistentVolumeClaim"]["claimName"]
    )
    for name in ("superlink", "superexec"):
        mounts = [m for m in containers[name]["volumeMounts"] if m["name"] == claim]
        assert mounts and home.startswith(mounts[0]["mountPath"] + "/"), (
            f"{name}: the home {home} must be on the persistent volume"
        )
        assert not mounts[0].get("readOnly")


def test_kubernetes_tls_secret_has_the_three_files_and_is_mounted_read_only() -> None:
    generator = _kustomization()["secretGenerator"]
    assert [g["name"] for g in generator] == ["fedtune-tls"]
    keys = {entry.split("=", 1)[0] for entry in generator[0]["files"]}
    assert keys == TLS_FILES, f"the Secret must hold exactly {TLS_FILES}, got {keys}"
    secret_volumes = [v for v in _pod()["volumes"] if "secret" in v]
    assert len(secret_volumes) == 1
    secret = secret_volumes[0]["secret"]
    assert secret["secretName"] == "fedtune-tls"
    assert {item["key"] for item in secret["items"]} == TLS_FILES, "never mount ca.key"
    name = secret_volumes[0]["name"]
    pod = _pod()
    for container in pod["containers"] + pod.get("initContainers", []):
        for mount in container.get("volumeMounts", []):
            if mount["name"] == name:
                assert mount.get("readOnly") is True, f"{container['name']}: mount it read-only"
    proxy_mounts = {m["name"]: m["mountPath"] for m in _containers()["proxy"]["volumeMounts"]}
    assert proxy_mounts[name] == "/etc/nginx/tls", "where nginx.conf reads its certificate"
    assert "tls/" in (KUBERNETES / ".gitignore").read_text().split(), "never commit the keys"


def test_kubernetes_pod_runs_as_non_root() -> None:
    pod = _pod()
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    for container in pod["containers"] + pod.get("initContainers", []):
        own = container.get("securityContext", {})
        assert own.get("allowPrivilegeEscalation") is False, container["name"]
        assert own.get("capabilities", {}).get("drop") == ["ALL"], container["name"]


def test_kubernetes_service_exposes_only_the_proxy_on_443() -> None:
    service = _manifests()["Service"]["spec"]
    assert [p["port"] for p in service["ports"]] == [443]
    proxy = _containers()["proxy"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert str(ports[service["ports"][0]["targetPort"]]) == _nginx_listen_port()
    assert proxy["readinessProbe"]["tcpSocket"]["port"] in ports
    for name in ("superlink", "superexec"):
        assert not _containers()[name].get("ports"), f"{name} must not declare ports"


def test_kubernetes_configmap_is_deploy_proxy_nginx_conf() -> None:
    config = _manifests()["ConfigMap"]["data"]["nginx.conf"]
    assert config == NGINX_CONF.read_text(), (
        "deploy/kubernetes/proxy-config.yaml differs from deploy/proxy/nginx.conf; "
        "paste the file into the ConfigMap again"
    )
    mounts = {m["mountPath"]: m for m in _containers()["proxy"]["volumeMounts"]}
    assert mounts["/etc/nginx/nginx.conf"]["subPath"] == "nginx.conf"


# --- Dockerfile ------------------------------------------------------------------------------


def _dockerfile() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]


def test_dockerfile_pins_torch_by_build_arg_and_installs_with_the_constraints() -> None:
    instructions = _dockerfile()
    args = dict(
        i.split(None, 1)[1].split("=", 1) for i in instructions if i.startswith("ARG ") and "=" in i
    )
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert args["TORCH_VERSION"] == pins["torch"], "the image's torch must be the pinned one"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", "CPU by default"
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert "FROM ${PYTHON_IMAGE}" in instructions
    runs = " ".join(i for i in instructions if i.startswith("RUN "))
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert "pip install -c constraints.txt" in runs
    assert runs.index("torch==${TORCH_VERSION}") < runs.index("-c constraints.txt")


def test_dockerfile_runs_offline_as_non_root_and_copies_only_what_it_needs() -> None:
    instructions = _dockerfile()
    env = " ".join(i for i in instructions if i.startswith("ENV "))
    for setting in ("HF_HUB_OFFLINE=1", "FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1"):
        assert setting in env.split(), f"the image must set {setting}"
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}, "the containers run as non-root"
    for copy in (i for i in instructions if i.startswith("COPY ")):
        *sources, _ = copy.split()[1:]
        assert "." not in sources, "copy only what the image needs, never the whole context"
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for pattern in (".venv", "data", "runs", ".git", "**/*.key", "**/*.pem", "**/__pycache__"):
        assert pattern in ignored, f"Dockerfile.dockerignore must exclude {pattern}"


# --- Commands named anywhere in deploy/ -------------------------------------------------


def _tokens(line: str) -> list[str]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    return [w.strip("`[]\"',()") for w in words]


def _code_lines(path: Path) -> Iterator[str]:
    """Lines that hold commands: code and inline code in Markdown; command-like comment
    lines and instructions elsewhere."""
    text = path.read_text().replace("\\\n", " ")
    if path.suffix == ".md":
        fenced = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)
        for block in fenced:
            yield from block.splitlines()
        outside = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
        yield from re.findall(r"`([^`\n]+)`", outside)
        return
    for line in text.splitlines():
        yield from re.findall(r"`([^`\n]+)`", line)
        comment = line.lstrip()
        if comment.startswith("#"):
            body = comment.lstrip("#").strip()
            if body.startswith(PROGRAMS) or re.search(r"\b(docker|kubectl)\b", body):
                yield body
        else:
            yield line


def _invocations(words: list[str]) -> Iterator[tuple[str, str, list[str]]]:
    for i, word in enumerate(words):
        program = next((p for p in PROGRAMS if word == p or word.endswith("/bin/" + p)), None)
        if program is None or i + 1 >= len(words):
            continue
        rest = words[i + 1 :]
        end = next(
            (k for k, w in enumerate(rest) if w in {"|", "||", "&&", ";", ">", "<"}), len(rest)
        )
        rest = rest[:end]
        if rest[0].startswith("-"):
            yield program, "", [w for w in rest if w.startswith("-")]
        elif re.fullmatch(r"[a-z][a-z-]*", rest[0]):
            yield program, rest[0], [w.split("=")[0] for w in rest[1:] if w.startswith("--")]


def _deploy_invocations() -> Iterator[tuple[str, str, str, list[str]]]:
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        where = str(path.relative_to(ROOT))
        for line in _code_lines(path):
            for program, sub, flags in _invocations(_tokens(line)):
                yield where, program, sub, flags
    services = {**_services("coordinator"), **_services("site")}
    commands = [s.get("command") for s in services.values()]
    pod = _pod()
    commands += [c.get("command") for c in pod["containers"] + pod.get("initContainers", [])]
    for command in commands:
        if isinstance(command, list):
            for program, sub, flags in _invocations([str(w) for w in command]):
                yield "a compose or Kubernetes command", program, sub, flags


def test_deploy_files_use_only_real_subcommands_and_flags() -> None:
    seen = set()
    for where, program, sub, flags in _deploy_invocations():
        if not sub:
            assert set(flags) <= TOP_LEVEL_FLAGS, f"{where}: {program} {flags}"
            continue
        known = COMMANDS[program]
        assert sub in known, f"{where}: `{program} {sub}` is not a command ({sorted(known)})"
        unknown = set(flags) - known[sub]
        assert not unknown, f"{where}: `{program} {sub}` has no flag {sorted(unknown)}"
        seen.add((program, sub))
    runbook = {(p, s) for p, subs in COMMANDS.items() for s in subs}
    assert runbook <= seen, f"the runbook never shows {sorted(runbook - seen)}"


@pytest.mark.parametrize(("program", "sub"), [(p, s) for p, subs in COMMANDS.items() for s in subs])
def test_the_flag_table_matches_the_real_commands(
    program: str, sub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if program == "fedtune-server":
        from server.cli import main
    else:
        from client.cli import main
    with pytest.raises(SystemExit) as exit_:
        main([sub, "--help"])
    assert exit_.value.code == 0, f"{program} {sub} --help failed"
    flags = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    assert COMMANDS[program][sub] <= flags, (
        f"{program} {sub} lacks {COMMANDS[program][sub] - flags}"
    )


def test_runbook_config_examples_are_valid_settings() -> None:
    blocks = re.findall(r"^```toml\n(.*?)^```", (DEPLOY / "README.md").read_text(), re.M | re.S)
    assert blocks, "the runbook shows a run config"
    defaults = flatten(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    )
    for block in blocks:
        load_config({**defaults, **flatten(tomllib.loads(block))})
