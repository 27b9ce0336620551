"""The replicated Redis with Sentinel (issue 17): docker-compose.ha.yml merged over
docker-compose.yml, and the k8s/redis-ha overlay of k8s/base, each a primary, a replica and three
sentinels (quorum 2) that every front, worker and KEDA use; the Redis nodes' start script, which
asks the sentinels for the node's role. How the files are read and built:
tests/deploy_manifests.py."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from shared import keys
from shared.settings import Settings
from tests.deploy_manifests import (
    HA_COMPOSE,
    HA_OVERLAY,
    K8S_VERSIONS,
    ROOT,
    built,
    compose_ha,
    container_env,
    find_base,
    find_doc,
    ha_by_hand,
    ha_compose_file,
    ha_documents,
    keyed,
    kustomization,
    merged_ha_services,
    need_kubectl,
    pod_dns,
    redis_options,
    validate_documents,
)

# ----- the compose variant: docker-compose.ha.yml over docker-compose.yml -----

SENTINEL_SETTINGS = {"down-after-milliseconds": "5000", "failover-timeout": "30000", "parallel-syncs": "1"}
# The start scripts end by handing over to Redis; the checks below stop them there.
NODE_EXEC = 'exec docker-entrypoint.sh redis-server "$@"'
SENTINEL_EXEC = 'exec docker-entrypoint.sh redis-server "$conf" --sentinel'


def _sh(script: str, args: list[str], env: dict[str, str], cwd: Path) -> str:
    if shutil.which("sh") is None or shutil.which("timeout") is None:
        pytest.skip("sh and timeout are needed to run the start scripts")
    result = subprocess.run(
        ["sh", "-c", script, "sh", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _sentinel_config(script: str, env: dict[str, str], tmp_path: Path) -> dict[str, list[str]]:
    """Run a sentinel's config-writing script (in tmp_path, not /data) and read back what it wrote:
    {directive: words after it}, `sentinel X` directives as "sentinel X"."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = script.replace(SENTINEL_EXEC, "").replace("/data/", f"{tmp_path}/")
    _sh(script, [], {"PATH": os.environ["PATH"], **env}, tmp_path)
    config: dict[str, list[str]] = {}
    for line in (tmp_path / "sentinel.conf").read_text().splitlines():
        words = line.split()
        if words and words[0] == "sentinel":
            config[f"sentinel {words[1]}"] = words[2:]
        elif words:
            config[words[0]] = words[1:]
    return config


def _check_sentinel_config(config: dict[str, list[str]], self: str, master: str, primary: str) -> None:
    assert config["port"] == ["26379"]
    assert config["sentinel resolve-hostnames"] == ["yes"] and config["sentinel announce-hostnames"] == [
        "yes"
    ]
    assert config["sentinel announce-ip"] == [self]
    assert config["sentinel monitor"] == [master, primary, "6379", "2"]  # quorum 2 of 3
    for name, value in SENTINEL_SETTINGS.items():
        assert config[f"sentinel {name}"] == [master, value]


def _check_compose_ha(services: dict[str, Any], tmp_path: Path) -> None:
    """The merged HA compose config: a primary, a replica of it with the same settings as the
    base file's Redis, three sentinels (quorum 2) watching it, every front and worker on them."""
    base = redis_options(
        yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]["command"][1:]
    )
    base["maxmemory"] = ["2gb"]  # its ${STREAMQ_REDIS_MAXMEMORY:-2gb}, as merged
    sentinels = sorted(name for name in services if name.startswith("sentinel-"))
    assert len(sentinels) == 3
    addresses = [f"{name}:26379" for name in sentinels]
    nodes: dict[str, dict[str, list[str]]] = {}
    for name in ("redis", "redis-replica"):
        shell, dash_c, script, _name, *args = services[name]["command"]
        assert (shell, dash_c) == ("sh", "-c") and script.rstrip().endswith(NODE_EXEC)
        options = nodes[name] = redis_options(args)
        assert options["replica-announce-ip"] == [name]
        assert services[name]["environment"]["SENTINELS"].split(",") == addresses
        # Either may become the primary: both keep the base's settings (AOF, noeviction, ...).
        assert {k: v for k, v in options.items() if k in base} == base, name
        assert any(str(v).split(":")[1] == "/data" for v in services[name]["volumes"])
    assert "replicaof" not in nodes["redis"] and nodes["redis-replica"]["replicaof"] == ["redis", "6379"]
    assert {k: v for k, v in nodes["redis"].items() if k != "replica-announce-ip"} == {
        k: v for k, v in nodes["redis-replica"].items() if k not in ("replicaof", "replica-announce-ip")
    }
    assert services["redis"]["volumes"] != services["redis-replica"]["volumes"]
    master = services["redis"]["environment"]["SENTINEL_MASTER"]
    assert master == "streamq" == services["redis-replica"]["environment"]["SENTINEL_MASTER"]
    for name in sentinels:
        service = services[name]
        shell, dash_c, script = service["command"]
        assert (shell, dash_c) == ("sh", "-c") and script.rstrip().endswith(SENTINEL_EXEC)
        config = _sentinel_config(script, service["environment"], tmp_path / name)
        _check_sentinel_config(config, self=name, master=master, primary="redis")
        # Its config is its state (the primary after a failover, its id): on a volume.
        assert any(str(v).split(":")[1] == "/data" for v in service["volumes"])
    clients = [name for name, s in services.items() if "build" in s]
    assert set(clients) == {"api", "worker", "worker-cpu", "worker-vllm"}
    for name in clients:
        env = services[name]["environment"]
        assert env["STREAMQ_REDIS_SENTINELS"].split(",") == addresses, name
        assert env["STREAMQ_REDIS_SENTINEL_MASTER"] == master, name
        settings = Settings(
            redis_url=env["STREAMQ_REDIS_URL"],
            redis_sentinels=env["STREAMQ_REDIS_SENTINELS"],
            redis_sentinel_master=env["STREAMQ_REDIS_SENTINEL_MASTER"],
        )
        assert settings.sentinel_addresses() == [(s, 26379) for s in sentinels]
        assert settings.replicas_to_wait_for() == 1  # a front's 202 waits for the replica


def test_compose_ha_override_validates() -> None:
    result = compose_ha("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_ha_has_a_primary_a_replica_and_three_sentinels_every_process_uses(tmp_path: Path) -> None:
    _check_compose_ha(merged_ha_services(), tmp_path)


def test_compose_ha_checks_can_fail(tmp_path: Path) -> None:
    """docker-compose refuses a broken override, and the check above a wrong variant."""
    spec = yaml.safe_load(HA_COMPOSE.read_text())
    spec["services"]["redis-replica"]["helthcheck"] = spec["services"]["redis-replica"].pop("healthcheck")
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(spec))
    result = compose_ha("config", "-q", override=broken)
    assert result.returncode != 0 and "helthcheck" in result.stderr
    good = merged_ha_services()

    def quorum_of_1(services: dict[str, Any]) -> None:
        command = services["sentinel-3"]["command"]
        command[2] = command[2].replace(' 6379 2"', ' 6379 1"')

    def replica_of_nothing(services: dict[str, Any]) -> None:
        command = services["redis-replica"]["command"]
        del command[command.index("--replicaof") : command.index("--replicaof") + 3]

    for i, breakage in enumerate(
        (
            quorum_of_1,
            replica_of_nothing,
            lambda s: s["sentinel-2"]["environment"].update(SENTINEL_MASTER="other"),
            lambda s: s["redis-replica"]["command"].remove("noeviction"),
            lambda s: s["worker-cpu"]["environment"].pop("STREAMQ_REDIS_SENTINELS"),
            lambda s: s.pop("sentinel-3"),
        )
    ):
        services = copy.deepcopy(good)
        breakage(services)
        with pytest.raises((AssertionError, KeyError)):
            _check_compose_ha(services, tmp_path / f"variant-{i}")


def _node_start(script: str, args: list[str], sentinel_reply: str | None, tmp_path: Path) -> list[str]:
    """Run a Redis node's start script with stand-ins for redis-cli (every sentinel gives
    `sentinel_reply`, or none answers), sleep and Redis itself: the arguments Redis gets."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fakes = {
        "redis-cli": f"printf '%s\\n' {sentinel_reply}" if sentinel_reply else "echo refused >&2; exit 1",
        "sleep": "true",
        "redis-server": 'printf "%s\\n" "$@"',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = script.replace(NODE_EXEC, 'exec redis-server "$@"')
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SENTINELS": "s1:26379,s2:26379",
        "SENTINEL_MASTER": "m",
    }
    return _sh(script, args, env, tmp_path).splitlines()[1:]  # after the line saying the role


def _without_replicaof(args: list[str]) -> list[str]:
    return [a for i, a in enumerate(args) if "--replicaof" not in args[max(0, i - 2) : i + 1]]


def test_compose_ha_nodes_take_their_role_from_the_sentinels(tmp_path: Path) -> None:
    """A node that restarts after a failover follows the sentinels, not its command line; with
    no sentinel to ask (the first start) the command line holds; a node never replicates itself."""
    services = ha_compose_file()["services"]
    for name, other in (("redis", "redis-replica"), ("redis-replica", "redis")):
        *_sh_c, script, _name = services[name]["command"][:4]
        args = services[name]["command"][4:]
        plain = _without_replicaof(args)
        first = _node_start(script, args, None, tmp_path)
        assert first == (plain if name == "redis" else [*plain, "--replicaof", "redis", "6379"])
        assert _node_start(script, args, "ERR no such master", tmp_path) == first
        assert _node_start(script, args, f"{name} 6379", tmp_path) == plain
        assert _node_start(script, args, f"{other} 6380", tmp_path) == [*plain, "--replicaof", other, "6380"]


# ----- the Kubernetes variant: k8s/redis-ha -----


def _check_ha_overlay(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """Replicated Redis (2 pods, data on claims), 3 sentinels (quorum 2) watching pod 0 under the
    master name the fronts, workers and KEDA use; the base's single Redis gone."""
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    redis_images = [
        d for d in workloads if d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis")
    ]
    assert {d["metadata"]["name"] for d in redis_images} == {"redis-ha", "redis-sentinel"}
    assert not [d for d in docs if d["metadata"]["name"] == "redis"]  # nothing left of the single Redis
    config = find_doc(docs, "ConfigMap", "streamq-config")["data"]
    scripts = find_doc(docs, "ConfigMap", "redis-ha-scripts")["data"]
    nodes = find_doc(docs, "StatefulSet", "redis-ha")
    sentinels = find_doc(docs, "StatefulSet", "redis-sentinel")
    assert nodes["spec"]["replicas"] == 2 and sentinels["spec"]["replicas"] == 3
    for sts in (nodes, sentinels):
        service = find_doc(docs, "Service", sts["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        mounts = sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in mounts
    master = config["STREAMQ_REDIS_SENTINEL_MASTER"]
    addresses = [f"{pod_dns(sentinels, i)}:26379" for i in range(3)]
    assert config["STREAMQ_REDIS_SENTINELS"].split(",") == addresses
    settings = Settings(
        **{k.removeprefix("STREAMQ_").lower(): v for k, v in config.items() if k.startswith("STREAMQ_")}
    )
    assert settings.sentinel_addresses() == [(pod_dns(sentinels, i), 26379) for i in range(3)]
    assert settings.replicas_to_wait_for() == 1
    # Each sentinel's init container writes its config: quorum 2, watching pod 0, by DNS names.
    pod_spec = sentinels["spec"]["template"]["spec"]
    (init,) = pod_spec["initContainers"]
    assert init["command"] == ["sh", "/scripts/sentinel-conf.sh"]
    assert pod_spec["containers"][0]["command"] == ["redis-server", "/data/sentinel.conf", "--sentinel"]
    for i in range(3):
        pod = f"{sentinels['metadata']['name']}-{i}"
        env = container_env(init, pod, config)
        written = _sentinel_config(scripts["sentinel-conf.sh"], env, tmp_path / pod)
        _check_sentinel_config(written, self=pod_dns(sentinels, i), master=master, primary=pod_dns(nodes, 0))
    # The Redis pods: the base Redis's settings, pod 0's name to replicate, their own names to
    # announce, the sentinels (for their role) from the same ConfigMap keys as the clients.
    (container,) = nodes["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "/scripts/start-node.sh"]
    options = redis_options(container["args"])
    base_redis = find_base("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    base = redis_options(base_redis["args"])
    assert {k: v for k, v in options.items() if k in base} == base
    assert options["replicaof"] == [pod_dns(nodes, 0), "6379"]
    assert options["replica-announce-ip"] == [
        f"$(POD_NAME).{nodes['spec']['serviceName']}.streamq.svc.cluster.local"
    ]
    env = container_env(container, "redis-ha-1", config)
    assert env["SENTINELS"] == config["STREAMQ_REDIS_SENTINELS"] and env["SENTINEL_MASTER"] == master
    # KEDA reads the queue's length from the primary the sentinels name.
    trigger = find_doc(docs, "ScaledObject", "streamq-worker")["spec"]["triggers"][0]
    assert trigger["type"] == "redis-sentinel"
    assert trigger["metadata"]["addresses"] == config["STREAMQ_REDIS_SENTINELS"]
    assert trigger["metadata"]["sentinelMaster"] == master
    assert trigger["metadata"]["listName"] == keys.rq_queue(config["STREAMQ_SERVED_NAME"])
    assert "address" not in trigger["metadata"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_redis_ha_overlay_validates(version: str) -> None:
    validate_documents(ha_documents(), version)


def test_k8s_redis_ha_overlay_replicates_redis_behind_sentinels(tmp_path: Path) -> None:
    docs = ha_documents()
    _check_ha_overlay(docs, tmp_path)
    # The same scripts as the compose file's (less the sentinels' start, a container of its own here).
    scripts = find_doc(docs, "ConfigMap", "redis-ha-scripts")["data"]
    compose = ha_compose_file()
    assert scripts["start-node.sh"] == compose["x-redis-node-start"]
    assert scripts["sentinel-conf.sh"] + SENTINEL_EXEC + "\n" == compose["x-sentinel-start"]


def test_k8s_redis_ha_pods_take_their_role_from_the_sentinels(tmp_path: Path) -> None:
    docs = ha_documents()
    script = find_doc(docs, "ConfigMap", "redis-ha-scripts")["data"]["start-node.sh"]
    nodes = find_doc(docs, "StatefulSet", "redis-ha")
    args = nodes["spec"]["template"]["spec"]["containers"][0]["args"]
    pod0, pod1 = pod_dns(nodes, 0), pod_dns(nodes, 1)
    for ordinal in (0, 1):
        pod_args = [a.replace("$(POD_NAME)", f"{nodes['metadata']['name']}-{ordinal}") for a in args]
        plain = _without_replicaof(pod_args)
        # First start, no sentinel yet: pod 0 the primary, pod 1 its replica.
        expected = plain if ordinal == 0 else [*plain, "--replicaof", pod0, "6379"]
        assert _node_start(script, pod_args, None, tmp_path) == expected
        # After a failover to pod 1: pod 1 stays the primary, pod 0 comes back as its replica.
        expected = plain if ordinal == 1 else [*plain, "--replicaof", pod1, "6379"]
        assert _node_start(script, pod_args, f"{pod1} 6379", tmp_path) == expected


def test_k8s_redis_ha_checks_can_fail(tmp_path: Path) -> None:
    """Without its delete patches the overlay keeps the single Redis, which the check refuses; a
    KEDA patch meets a base trigger it does not expect; a misspelt field is refused."""
    overlay = kustomization(HA_OVERLAY)
    overlay["patches"] = [p for p in overlay["patches"] if not p["path"].startswith("delete-")]
    kept = ha_documents(overlay, tmp_path / "build")  # built outside the raises: it must build
    with pytest.raises(AssertionError):
        _check_ha_overlay(kept, tmp_path)
    scaled = copy.deepcopy(find_base("ScaledObject", "streamq-worker"))
    scaled["spec"]["triggers"][0]["type"] = "redis-sentinel"
    ops = yaml.safe_load((HA_OVERLAY / "keda-trigger-patch.yaml").read_text())
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(scaled, ops)
    sentinels = copy.deepcopy(find_doc(ha_documents(), "StatefulSet", "redis-sentinel"))
    sentinels["spec"]["template"]["spec"]["initContainer"] = sentinels["spec"]["template"]["spec"].pop(
        "initContainers"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sentinels, K8S_VERSIONS[0], strict=True)


def test_k8s_redis_ha_overlay_builds_with_kustomize() -> None:
    """kustomize builds k8s/redis-ha as read here by hand."""
    need_kubectl()
    assert keyed(list(built(HA_OVERLAY))) == keyed(ha_by_hand())
