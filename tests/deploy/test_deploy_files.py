"""The example configuration and the container file."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import DEPLOY, EXAMPLE_CONFIG, ROOT

from membrokerd.config import BrokerConfig, load_config


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("MEMBROKER_")]:
        monkeypatch.delenv(var)


def test_example_config_loads(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    config = load_config(Path("deploy/membrokerd.toml"))
    assert config.runtime_dir == Path("/run/membroker")


def test_example_config_lists_every_setting_with_its_default(clean_env: None) -> None:
    """A new setting must be documented here; a changed default must be updated here."""
    in_file = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert set(in_file) == set(BrokerConfig.model_fields)
    loaded = load_config(EXAMPLE_CONFIG)
    defaults = BrokerConfig()
    for name in BrokerConfig.model_fields:
        # These defaults depend on the uid (and state_dir's on runtime_dir): the file shows
        # root's.
        if name not in ("runtime_dir", "state_dir"):
            assert getattr(loaded, name) == getattr(defaults, name), name
    assert (
        loaded.journal_dir
        == defaults.model_copy(update={"runtime_dir": loaded.runtime_dir}).journal_dir
    )


def test_example_config_comments_every_setting() -> None:
    """Every key is preceded by a comment line explaining it (directly or in its group)."""
    lines = EXAMPLE_CONFIG.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+\s*=", line):
            j = i - 1
            while j >= 0 and re.match(r"^[a-z_]+\s*=", lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"no comment above {line!r}"


KNOWN_INSTRUCTIONS = {
    "FROM",
    "ARG",
    "RUN",
    "COPY",
    "ADD",
    "ENV",
    "VOLUME",
    "EXPOSE",
    "STOPSIGNAL",
    "ENTRYPOINT",
    "CMD",
    "USER",
    "WORKDIR",
    "LABEL",
    "HEALTHCHECK",
    "SHELL",
    "ONBUILD",
}


def test_containerfile_is_sane() -> None:
    """Without podman or a local base image here, check what can be checked offline."""
    text = (DEPLOY / "Containerfile").read_text()
    logical, current = [], ""
    for raw in text.splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    assert not current, "dangling line continuation"
    words = [line.split(None, 1) for line in logical]
    assert all(w[0] in KNOWN_INSTRUCTIONS for w in words), [w[0] for w in words]
    assert [w[0] for w in words].index("FROM") <= 1  # only ARG may precede FROM
    entry = json.loads(next(w[1] for w in words if w[0] == "ENTRYPOINT"))
    assert entry[1:] == ["--config", "/etc/membroker/membrokerd.toml"]
    for w in words:
        if w[0] == "COPY" and w[1].startswith("deploy/"):
            assert (ROOT / w[1].split()[0]).exists(), w[1]
    assert "localhost/" in text, "base images must be local: no registry is reachable"


# -- the image's build context and the Kubernetes examples (deploy/kubernetes/) ----------------

KUBERNETES = DEPLOY / "kubernetes"
HEALTH_COMMAND = ["/usr/local/bin/membrokerd-health"]


def _unit_capabilities() -> set[str]:
    """CAP_X of deploy/membrokerd.service's CapabilityBoundingSet=, as Kubernetes spells them."""
    lines = [
        line.split("=", 1)[1]
        for line in (DEPLOY / "membrokerd.service").read_text().splitlines()
        if line.startswith("CapabilityBoundingSet=")
    ]
    return {cap.removeprefix("CAP_") for cap in lines[-1].split()}


def test_containerignore_admits_only_what_the_containerfile_copies() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".containerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert rules[0] == "*", "everything out first, then what the image needs back in"
    admitted = {rule[1:].rstrip("/") for rule in rules[1:] if rule.startswith("!")}
    copied = set(re.findall(r"^COPY\s+(\S+)", (DEPLOY / "Containerfile").read_text(), re.M))
    assert {c.rstrip("/") for c in copied} == admitted


def test_containerfile_has_a_healthcheck_and_the_health_command() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    assert re.search(
        r"^HEALTHCHECK .*\\\n\s+CMD \[\"/usr/local/bin/membrokerd-health\"\]", text, re.M
    )
    assert "> /usr/local/bin/membrokerd-health" in text
    assert "--no-index" in text  # installs from the local wheelhouse only
    assert re.search(r"^USER 0:0$", text, re.M)


def _manifests() -> dict[str, list[dict[str, object]]]:
    yaml = pytest.importorskip("yaml")  # the test extra has it (pyproject.toml)
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(KUBERNETES.glob("*.yaml"))
    }


def _one(docs: list[dict[str, object]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _broker_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec["containers"] if c["name"] == "membrokerd"]
    return container


def _check_broker_container(container: dict[str, Any]) -> None:
    """As the systemd unit: root, the unit's three capabilities and no others, no way to more."""
    assert container["image"].startswith("localhost/membrokerd")
    sc = container["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert (
        set(sc["capabilities"]["add"])
        == _unit_capabilities()
        == {
            "SYS_PTRACE",
            "DAC_READ_SEARCH",
            "KILL",
        }
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # exec, not grpc: a grpc probe dials TCP, the broker serves gRPC on a Unix socket.
        assert container[probe]["exec"]["command"] == HEALTH_COMMAND, probe
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/run/membroker" in mounts
    assert [p["containerPort"] for p in container["ports"]] == [9464]


def test_kubernetes_manifests_parse() -> None:
    manifests = _manifests()
    assert set(manifests) == {"membrokerd-sidecar.yaml", "membrokerd-daemonset.yaml"}
    for name, docs in manifests.items():
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), (name, doc)


def test_kubernetes_sidecar_pod(tmp_path: Path, clean_env: None) -> None:
    docs = _manifests()["membrokerd-sidecar.yaml"]
    spec = _one(docs, "Pod")["spec"]
    # Clients must have a pid in the broker's PID namespace to be verified.
    assert spec["shareProcessNamespace"] is True
    assert not spec.get("hostPID") and not spec.get("hostNetwork")
    volumes = {v["name"]: v for v in spec["volumes"]}
    run_volume = next(n for n, v in volumes.items() if "emptyDir" in v)
    for container in spec["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/run/membroker") == run_volume, container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    broker = _broker_container(spec)
    _check_broker_container(broker)
    # The other containers: non-root, each its own uid (they see each other's processes).
    others = [c for c in spec["containers"] if c is not broker]
    uids = [c["securityContext"]["runAsUser"] for c in others]
    assert all(uid > 0 for uid in uids) and len(set(uids)) == len(uids)
    assert all("add" not in c["securityContext"]["capabilities"] for c in others)
    # The emptyDir is 0777: the init container makes it 0755, which the broker requires.
    (init,) = spec["initContainers"]
    assert init["command"] == ["chmod", "0755", "/run/membroker"]
    assert init["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The configuration is a valid membrokerd.toml, and its policy names the pod's uids.
    config_map = _one(docs, "ConfigMap")
    assert {v["configMap"]["name"] for v in volumes.values() if "configMap" in v} == {
        config_map["metadata"]["name"]
    }
    assert any(m["mountPath"] == "/etc/membroker" for m in broker["volumeMounts"])
    path = tmp_path / "membrokerd.toml"
    path.write_text(config_map["data"]["membrokerd.toml"])
    config = load_config(path)
    assert set(config.owner_uids) | set(config.attach_uids) == set(uids)
    assert {u for allowed in config.client_names.values() for u in allowed} == set(uids)


def test_kubernetes_node_daemonset() -> None:
    docs = _manifests()["membrokerd-daemonset.yaml"]
    daemonset = _one(docs, "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    # The node's PID namespace holds every pod's: every client on the node is verifiable.
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork")
    assert daemonset["metadata"]["namespace"] == _one(docs, "Namespace")["metadata"]["name"]
    _check_broker_container(_broker_container(spec))
    (volume,) = spec["volumes"]
    assert volume["hostPath"] == {"path": "/run/membroker", "type": "DirectoryOrCreate"}
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= (
        daemonset["spec"]["template"]["metadata"]["labels"].items()
    )
