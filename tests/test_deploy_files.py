"""The deployment files: docker-compose.yml validates with docker-compose, every k8s/ manifest
validates against its schema (Kubernetes' own; KEDA's CRD schema for the ScaledObject), and the
manifests agree with the code (queue key, drain time, probes).

k8s/base is the single-Redis deployment; k8s/vllm and k8s/redis-ha are overlays of it, beside it
(kustomize refuses an overlay inside its base's folder). The overlays are checked as `kubectl
kustomize` builds them; without a kubectl (kustomize v5) on PATH, as read here by hand (the
base, then the overlay's resources, patches and images), which the kustomize tests compare with
kustomize's own build where kubectl is there."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import fakeredis
import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from rq.queue import Queue

from shared import keys
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
BASE = K8S / "base"
VLLM_OVERLAY = K8S / "vllm"
HA_OVERLAY = K8S / "redis-ha"
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-scaledobject-v1alpha1.yaml"
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())  # oldest we target, newest known


# ----- docker-compose -----------------------------------------------------------------------


def _compose(*args: str, file: Path = ROOT / "docker-compose.yml") -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it: apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMQ_", "COMPOSE_"))}
    return subprocess.run(
        [exe, "-f", str(file), *args], capture_output=True, text=True, env=env, timeout=60, cwd=file.parent
    )


def test_compose_file_validates() -> None:
    result = _compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_validation_catches_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: a service with an unknown key is refused."""
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    spec["services"]["api"]["healthcheck"]["tset"] = spec["services"]["api"]["healthcheck"].pop("test")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(spec))
    result = _compose("config", "-q", file=broken)
    assert result.returncode != 0 and "tset" in result.stderr


def test_compose_services_as_documented() -> None:
    result = _compose("--profile", "cpu", "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    # docker-compose v1 lists every profile's services in `config`; v2 only the active ones.
    assert (
        {"redis", "api", "worker", "worker-cpu"}
        <= set(services)
        <= {
            "redis",
            "api",
            "worker",
            "worker-cpu",
            "worker-vllm",
        }
    )
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    api, worker, cpu, redis = services["api"], services["worker"], services["worker-cpu"], services["redis"]
    # Fronts: scalable (a host port range, no fixed port for every replica), ready on /readyz.
    (port,) = api["ports"]
    assert port["target"] == 8000 and "-" in str(port["published"])
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["environment"]["STREAMQ_REDIS_URL"] == "redis://redis:6379/0"
    # GPU worker: one NVIDIA GPU, named (replicas of a service would all get the same one); a
    # stop lets it drain.
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert (
        device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]
    )
    drain = float(worker["environment"]["STREAMQ_DRAIN_SECONDS"])
    assert _seconds(worker["stop_grace_period"]) > drain
    assert worker["environment"]["STREAMQ_DEVICE"] == "cuda"
    # CPU worker: only with the profile, no GPU.
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["environment"]["STREAMQ_DEVICE"] == "cpu"
    # Redis keeps its data (append-only file on a volume) and never evicts job keys.
    assert "--appendonly" in redis["command"] and "noeviction" in redis["command"]
    assert any(str(v).endswith(":/data:rw") or str(v).endswith(":/data") for v in redis["volumes"])


def _seconds(duration: str | int | float) -> float:
    text = str(duration)
    return float(text[:-1]) * (60 if text.endswith("m") else 1) if text[-1] in "sm" else float(text)


# ----- Kubernetes ---------------------------------------------------------------------------


def _kustomization(folder: Path = BASE) -> dict[str, Any]:
    return dict(yaml.safe_load((folder / "kustomization.yaml").read_text()))


def _documents() -> list[tuple[str, dict[str, Any]]]:
    """The base's manifests as its files hold them (before its `images:`)."""
    docs = []
    for name in _kustomization()["resources"]:
        for doc in yaml.safe_load_all((BASE / name).read_text()):
            if doc:
                docs.append((name, doc))
    return docs


def _set_images(docs: list[dict[str, Any]], images: list[dict[str, str]]) -> None:
    """A kustomization's `images:` as kustomize applies them: a container's image of that name
    (whatever its tag) gets the new name and tag."""
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
            name, _, tag = container["image"].partition(":")
            for image in images:
                if image["name"] == name:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def _base_by_hand() -> list[dict[str, Any]]:
    """k8s/base as kustomize builds it, read by hand: its manifests, then its `images:`."""
    docs = [copy.deepcopy(d) for _f, d in _documents()]
    _set_images(docs, _kustomization().get("images", []))
    return docs


KUSTOMIZE_MIN = (5, 0)  # what these kustomizations are built with (kubectl 1.27 and later)


@functools.cache
def _kubectl() -> tuple[str | None, str]:
    """The kubectl that builds the kustomizations, or None and why there is none."""
    exe = shutil.which("kubectl")
    if exe is None:
        return None, (
            "kubectl is not on PATH, so kustomize's own build is not checked (the overlays are read"
            " by hand instead). .ci/run does not install it: Debian's kubernetes-client is kubectl"
            " 1.20, whose kustomize (v2) is too old for these kustomizations; install kubectl 1.27+"
            " (kustomize v5) to run this check"
        )
    result = subprocess.run(
        [exe, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60
    )
    version = json.loads(result.stdout).get("kustomizeVersion", "") if result.returncode == 0 else ""
    found = re.match(r"v(\d+)\.(\d+)", version)
    if found is None or (int(found[1]), int(found[2])) < KUSTOMIZE_MIN:
        return None, (
            f"{exe} bundles kustomize {version or '(unknown version)'}, older than v5, so kustomize's"
            " own build is not checked (the overlays are read by hand instead); install kubectl 1.27+"
        )
    return exe, ""


def _need_kubectl() -> str:
    exe, why = _kubectl()
    if exe is None:
        pytest.skip(why)
    return exe


def _kustomize(folder: Path) -> subprocess.CompletedProcess[str]:
    """`kubectl kustomize folder` (offline: it builds, it applies nothing)."""
    return subprocess.run(
        [_need_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


@functools.cache
def _built(folder: Path) -> tuple[dict[str, Any], ...]:
    result = _kustomize(folder)
    assert result.returncode == 0, f"kubectl kustomize {folder}: {result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _build(folder: Path) -> list[dict[str, Any]] | None:
    """The manifests `kubectl kustomize folder` gives, or None where there is no kubectl for it."""
    if _kubectl()[0] is None:
        return None
    return copy.deepcopy(list(_built(folder)))


def _keyed(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    keyed = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(keyed) == len(docs)
    return keyed


def _validate_documents(docs: list[dict[str, Any]], version: str) -> None:
    """Every manifest against its schema, in the namespace streamq."""
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            _validate_scaled_object(doc)
        else:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message}")
        assert doc["metadata"].get("namespace", "streamq") == "streamq" or doc["kind"] == "Namespace"


def _find(kind: str, name: str) -> dict[str, Any]:
    return next(d for _f, d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema with unknown fields refused: the API server prunes them silently, so a
    misspelt field would be lost without a word."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _validate_scaled_object(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.validate(doc, _strict(yaml.safe_load(KEDA_SCHEMA.read_text())))


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert _kustomization()["namespace"] == "streamq"


def test_k8s_layout_keeps_the_overlays_beside_their_base() -> None:
    """k8s/ holds the base and its overlays side by side (kustomize refuses an overlay inside its
    base's folder: "cycle detected"); k8s/kustomization.yaml is k8s/base, for `kubectl apply -k k8s/`."""
    assert {p.name for p in K8S.iterdir()} == {"kustomization.yaml", "base", "vllm", "redis-ha"}
    top = _kustomization(K8S)
    assert top["resources"] == ["base"] and set(top) == {"apiVersion", "kind", "resources"}
    for overlay in (VLLM_OVERLAY, HA_OVERLAY):
        assert _kustomization(overlay)["resources"][0] == "../base", overlay.name


def test_k8s_base_builds_with_kustomize() -> None:
    """kustomize builds k8s/base, and k8s/ as the same, as read here by hand."""
    _need_kubectl()
    built = _keyed(list(_built(BASE)))
    assert built == _keyed(_base_by_hand())
    assert _keyed(list(_built(K8S))) == built


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_k8s_manifest_validates(version: str) -> None:
    kinds = []
    for name, doc in _documents():
        if doc["kind"] == "ScaledObject":
            _validate_scaled_object(doc)
        else:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")
        assert doc["metadata"].get("namespace", "streamq") == "streamq" or doc["kind"] == "Namespace"
        kinds.append(doc["kind"])
    expected = {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Deployment", "Service"}
    expected |= {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ScaledObject", "PersistentVolumeClaim"}
    assert set(kinds) == expected


def test_validators_refuse_broken_manifests() -> None:
    """The validation above can fail: a misspelt field is refused by either schema."""
    deployment = copy.deepcopy(_find("Deployment", "streamq-api"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    scaled = copy.deepcopy(_find("ScaledObject", "streamq-worker"))
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        _validate_scaled_object(scaled)
    scaled = copy.deepcopy(_find("ScaledObject", "streamq-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 4  # trigger metadata are strings
    with pytest.raises(jsonschema.ValidationError):
        _validate_scaled_object(scaled)


def test_scaled_object_targets_the_queue_the_code_uses() -> None:
    config = _find("ConfigMap", "streamq-config")["data"]
    served = config["STREAMQ_SERVED_NAME"]
    scaled = _find("ScaledObject", "streamq-worker")["spec"]
    trigger, load_trigger = scaled["triggers"]
    assert trigger["type"] == "redis"
    # The list the workers take jobs from: streamq's key function, and RQ's own name for it.
    assert trigger["metadata"]["listName"] == keys.rq_queue(served)
    rq_queue = Queue(keys.queue_name(served), connection=fakeredis.FakeRedis())
    assert trigger["metadata"]["listName"] == rq_queue.key
    assert served in config["STREAMQ_MODELS"].split(",")  # the fronts wait for this model
    # It scales the worker Deployment, and reads the Redis the workers use.
    worker = _find("Deployment", "streamq-worker")
    assert scaled["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    redis_url = _find("Secret", "streamq-secrets")["stringData"]["STREAMQ_REDIS_URL"]
    assert redis_url.startswith(f"redis://{trigger['metadata']['address']}/")
    assert redis_url.endswith(f"/{trigger['metadata']['databaseIndex']}")
    redis_service = _find("Service", "redis")
    host = f"{redis_service['metadata']['name']}.{redis_service['metadata']['namespace']}.svc.cluster.local"
    assert trigger["metadata"]["address"] == f"{host}:{redis_service['spec']['ports'][0]['port']}"
    assert 0 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    # The second trigger asks a front (through its Service) for the model's waiting + running
    # jobs, one worker per STREAMQ_SLOTS of them.
    api_service = _find("Service", "streamq-api")
    api_host = f"{api_service['metadata']['name']}.{api_service['metadata']['namespace']}.svc.cluster.local"
    assert api_service["spec"]["ports"][0]["port"] == 80
    assert load_trigger["type"] == "metrics-api"
    assert load_trigger["metadata"]["url"] == f"http://{api_host}/scaling?model={served}"
    assert load_trigger["metadata"]["valueLocation"] == "load"
    assert load_trigger["metadata"]["targetValue"] == config["STREAMQ_SLOTS"]
    assert config.get("STREAMQ_SCALE_TO_ZERO") == "1" or scaled["minReplicaCount"] > 0


def test_worker_deployment_has_a_gpu_a_model_cache_and_time_to_drain() -> None:
    config = _find("ConfigMap", "streamq-config")["data"]
    Settings(**{k.removeprefix("STREAMQ_").lower(): v for k, v in config.items() if k.startswith("STREAMQ_")})
    pod = _find("Deployment", "streamq-worker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= float(config["STREAMQ_DRAIN_SECONDS"]) + 10
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["models"] == config["HF_HOME"]
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    claim = models["persistentVolumeClaim"]["claimName"]
    assert _find("PersistentVolumeClaim", claim)
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    assert port == int(config["STREAMQ_METRICS_PORT"])
    # Of the Secret, a worker gets the Redis URL only (no API keys).
    assert all("secretRef" not in source for source in container["envFrom"])
    (redis_url,) = [e for e in container["env"] if e["name"] == "STREAMQ_REDIS_URL"]
    assert redis_url["valueFrom"]["secretKeyRef"] == {"name": "streamq-secrets", "key": "STREAMQ_REDIS_URL"}


def test_front_is_ready_on_readyz_and_disruption_bounded() -> None:
    api = _find("Deployment", "streamq-api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"secretRef": {"name": "streamq-secrets"}} in container["envFrom"]
    labels = api["spec"]["selector"]["matchLabels"]
    assert _find("PodDisruptionBudget", "streamq-api")["spec"]["selector"]["matchLabels"] == labels
    assert _find("Service", "streamq-api")["spec"]["selector"] == labels
    hpa = _find("HorizontalPodAutoscaler", "streamq-api")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "streamq-api" and hpa["minReplicas"] >= 2


# ----- images -----------------------------------------------------------------------------------


def _stages() -> dict[str, set[str]]:
    """Each Dockerfile stage and the project folders it copies in."""
    stages: dict[str, set[str]] = {}
    current = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            current = words[-1]
            stages[current] = set()
        elif words[:1] == ["COPY"] and len(words) == 3 and (ROOT / words[1]).is_dir():
            stages[current].add(words[1])
    return stages


def test_every_image_carries_what_its_command_imports() -> None:
    """The `streamq` command (streamq/cli.py) wires in the subcommands of streamq/ (chat, ask, up,
    status), api/ and worker/, all over shared/: every image needs the four (the front's image without
    the worker's dependencies). And .dockerignore lets them all in."""
    stages = _stages()
    assert set(stages) == {"api", "worker", "worker-cpu", "worker-vllm"}
    for name, copied in stages.items():
        needed = {"shared", "api", "streamq", "worker"}
        assert needed <= copied, f"stage {name} lacks {needed - copied}"
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    assert all(f"!{folder}/" in allowed for folder in ("shared", "api", "streamq", "worker"))


# ----- vLLM's engine on several GPUs (issue 13) ----------------------------------------------------


def test_compose_vllm_worker_asks_for_as_many_gpus_as_it_splits_the_model_over() -> None:
    result = _compose("--profile", "vllm", "config")
    assert result.returncode == 0, result.stderr
    worker = yaml.safe_load(result.stdout)["services"]["worker-vllm"]
    assert worker["build"]["target"] == "worker-vllm" and worker["profiles"] == ["vllm"]
    env = worker["environment"]
    assert env["STREAMQ_ENGINE"] == "vllm" and env["STREAMQ_DEVICE"] == "cuda"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(device["device_ids"]) == int(env["STREAMQ_TENSOR_PARALLEL_SIZE"]) == 2
    Settings(engine=env["STREAMQ_ENGINE"], tensor_parallel_size=env["STREAMQ_TENSOR_PARALLEL_SIZE"])


def _vllm_by_hand() -> list[dict[str, Any]]:
    """k8s/vllm as kustomize builds it, read by hand: the base, its worker Deployment under the
    overlay's JSON 6902 patch, then the overlay's `images:`."""
    overlay = _kustomization(VLLM_OVERLAY)
    assert overlay["resources"] == ["../base"]
    (patch,) = overlay["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "streamq-worker"}
    ops = yaml.safe_load((VLLM_OVERLAY / patch["path"]).read_text())
    docs = _base_by_hand()
    (i,) = [
        i
        for i, d in enumerate(docs)
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "streamq-worker"
    ]
    docs[i] = jsonpatch.apply_patch(docs[i], ops)
    _set_images(docs, overlay["images"])
    return docs


def _vllm_documents() -> list[dict[str, Any]]:
    """k8s/vllm as `kubectl kustomize` builds it (by hand without kubectl)."""
    return _build(VLLM_OVERLAY) or _vllm_by_hand()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_vllm_overlay_validates_and_matches_its_gpus(version: str) -> None:
    docs = _vllm_documents()
    _validate_documents(docs, version)
    deployment = _get(docs, "Deployment", "streamq-worker")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STREAMQ_ENGINE"] == "vllm" and env["STREAMQ_DEVICE"] == "cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["STREAMQ_TENSOR_PARALLEL_SIZE"])
    (image,) = _kustomization(VLLM_OVERLAY)["images"]
    assert image["name"] == "streamq-worker-vllm"
    assert container["image"] == f"{image['newName']}:{image['newTag']}"
    # Only the worker Deployment differs from the base.
    base = _keyed(_build(BASE) or _base_by_hand())
    changed = {key for key, doc in _keyed(docs).items() if base.get(key) != doc}
    assert changed == {("Deployment", "streamq-worker")} and _keyed(docs).keys() == base.keys()


def test_k8s_vllm_overlay_builds_with_kustomize() -> None:
    """kustomize builds k8s/vllm as read here by hand."""
    _need_kubectl()
    assert _keyed(list(_built(VLLM_OVERLAY))) == _keyed(_vllm_by_hand())


def _overlay_copy(overlay: Path, kustomization: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of an overlay with another kustomization.yaml, on the repository's base (kustomize
    takes a relative path to it only)."""
    copied = tmp_path / overlay.name
    shutil.copytree(overlay, copied)
    kustomization = copy.deepcopy(kustomization)
    assert kustomization["resources"][0] == "../base"
    kustomization["resources"][0] = os.path.relpath(BASE, copied)
    (copied / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return copied


def test_k8s_vllm_overlay_check_can_fail(tmp_path: Path) -> None:
    """A patch op on a path the base lacks is refused (by hand, and by kustomize where kubectl is
    there), so a base change cannot leave the patch stale."""
    stale = [{"op": "replace", "path": "/spec/template/spec/volumes/7/emptyDir/sizeLimit", "value": "1Gi"}]
    with pytest.raises((jsonpatch.JsonPatchConflict, jsonpatch.JsonPointerException)):
        jsonpatch.apply_patch(_find("Deployment", "streamq-worker"), stale)
    if _kubectl()[0] is None:
        return
    copied = _overlay_copy(VLLM_OVERLAY, _kustomization(VLLM_OVERLAY), tmp_path)
    (patch,) = _kustomization(VLLM_OVERLAY)["patches"]
    ops = yaml.safe_load((VLLM_OVERLAY / patch["path"]).read_text())
    (copied / patch["path"]).write_text(yaml.safe_dump([*ops, *stale]))
    result = _kustomize(copied)
    assert result.returncode != 0 and "/volumes/7/emptyDir/sizeLimit" in result.stderr


# ----- a replicated Redis with Sentinel (issue 17) ------------------------------------------------

HA_COMPOSE = ROOT / "docker-compose.ha.yml"
SENTINEL_SETTINGS = {"down-after-milliseconds": "5000", "failover-timeout": "30000", "parallel-syncs": "1"}
# The start scripts end by handing over to Redis; the checks below stop them there.
NODE_EXEC = 'exec docker-entrypoint.sh redis-server "$@"'
SENTINEL_EXEC = 'exec docker-entrypoint.sh redis-server "$conf" --sentinel'


def _compose_ha(*args: str, override: Path = HA_COMPOSE) -> subprocess.CompletedProcess[str]:
    """docker-compose on docker-compose.yml with the override merged over it."""
    return _compose("-f", str(override), *args)


def _ha_compose_file() -> dict[str, Any]:
    """docker-compose.ha.yml as YAML reads it (anchors resolved, nothing interpolated), `$$` unescaped."""
    return dict(yaml.safe_load(HA_COMPOSE.read_text().replace("$$", "$")))


def _merged_ha_services(override: Path = HA_COMPOSE) -> dict[str, Any]:
    """The merged services, every profile's, with compose's `$$` unescaped as a container sees it."""
    result = _compose_ha("--profile", "cpu", "--profile", "vllm", "config", override=override)
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout.replace("$$", "$"))["services"])


def _options(args: list[str]) -> dict[str, list[str]]:
    """Redis command-line options: `--name value...` as {name: [value, ...]}."""
    options: dict[str, list[str]] = {}
    name = ""
    for arg in args:
        if arg.startswith("--"):
            name = arg[2:]
            options[name] = []
        else:
            assert name, f"a value before any option: {arg!r}"
            options[name].append(arg)
    return options


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
    base = _options(
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
        options = nodes[name] = _options(args)
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
    result = _compose_ha("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_ha_has_a_primary_a_replica_and_three_sentinels_every_process_uses(tmp_path: Path) -> None:
    _check_compose_ha(_merged_ha_services(), tmp_path)


def test_compose_ha_checks_can_fail(tmp_path: Path) -> None:
    """docker-compose refuses a broken override, and the check above a wrong variant."""
    spec = yaml.safe_load(HA_COMPOSE.read_text())
    spec["services"]["redis-replica"]["helthcheck"] = spec["services"]["redis-replica"].pop("healthcheck")
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(spec))
    result = _compose_ha("config", "-q", override=broken)
    assert result.returncode != 0 and "helthcheck" in result.stderr
    good = _merged_ha_services()

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
    services = _ha_compose_file()["services"]
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


def _overlay() -> dict[str, Any]:
    return _kustomization(HA_OVERLAY)


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch of maps (the overlay patches no lists this way)."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(base)
    for key, value in patch.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _ha_by_hand(overlay: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """k8s/redis-ha as kustomize builds it, read by hand: the base, its own resources, then its
    patches (a `$patch: delete`, a strategic merge of a map, or a JSON 6902 patch of a target)."""
    overlay = _overlay() if overlay is None else overlay
    assert overlay["resources"][0] == "../base"
    docs = _base_by_hand()
    for name in overlay["resources"][1:]:
        docs += [d for d in yaml.safe_load_all((HA_OVERLAY / name).read_text()) if d]

    def index(kind: str, name: str) -> int:
        (i,) = [i for i, d in enumerate(docs) if d["kind"] == kind and d["metadata"]["name"] == name]
        return i

    for patch in overlay["patches"]:
        text = (HA_OVERLAY / patch["path"]).read_text()
        if "target" in patch:
            target = patch["target"]
            i = index(target["kind"], target["name"])
            docs[i] = jsonpatch.apply_patch(docs[i], yaml.safe_load(text))
            continue
        for doc in yaml.safe_load_all(text):
            i = index(doc["kind"], doc["metadata"]["name"])
            if doc.get("$patch") == "delete":
                del docs[i]
            else:
                docs[i] = _merge(docs[i], doc)
    _set_images(docs, overlay.get("images", []))
    return docs


def _ha_documents(
    overlay: dict[str, Any] | None = None, tmp_path: Path | None = None
) -> list[dict[str, Any]]:
    """k8s/redis-ha (or a copy of it with another kustomization.yaml, built in tmp_path) as `kubectl
    kustomize` builds it; by hand without kubectl."""
    if _kubectl()[0] is None:
        return _ha_by_hand(overlay)
    if overlay is None:
        return _build(HA_OVERLAY) or []
    assert tmp_path is not None
    result = _kustomize(_overlay_copy(HA_OVERLAY, overlay, tmp_path))
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _get(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _pod_dns(statefulset: dict[str, Any], ordinal: int) -> str:
    meta = statefulset["metadata"]
    return (
        f"{meta['name']}-{ordinal}.{statefulset['spec']['serviceName']}.{meta['namespace']}.svc.cluster.local"
    )


def _container_env(container: dict[str, Any], pod: str, config: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet gives it: $(VAR) expanded, ConfigMap keys read."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            value = str(item["value"])
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            value = pod
        else:
            assert source["configMapKeyRef"]["name"] == "streamq-config"
            value = config[source["configMapKeyRef"]["key"]]
        env[item["name"]] = value
    return env


def _check_ha_overlay(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """Replicated Redis (2 pods, data on claims), 3 sentinels (quorum 2) watching pod 0 under the
    master name the fronts, workers and KEDA use; the base's single Redis gone."""
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    redis_images = [
        d for d in workloads if d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis")
    ]
    assert {d["metadata"]["name"] for d in redis_images} == {"redis-ha", "redis-sentinel"}
    assert not [d for d in docs if d["metadata"]["name"] == "redis"]  # nothing left of the single Redis
    config = _get(docs, "ConfigMap", "streamq-config")["data"]
    scripts = _get(docs, "ConfigMap", "redis-ha-scripts")["data"]
    nodes, sentinels = _get(docs, "StatefulSet", "redis-ha"), _get(docs, "StatefulSet", "redis-sentinel")
    assert nodes["spec"]["replicas"] == 2 and sentinels["spec"]["replicas"] == 3
    for sts in (nodes, sentinels):
        service = _get(docs, "Service", sts["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        mounts = sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in mounts
    master = config["STREAMQ_REDIS_SENTINEL_MASTER"]
    addresses = [f"{_pod_dns(sentinels, i)}:26379" for i in range(3)]
    assert config["STREAMQ_REDIS_SENTINELS"].split(",") == addresses
    settings = Settings(
        **{k.removeprefix("STREAMQ_").lower(): v for k, v in config.items() if k.startswith("STREAMQ_")}
    )
    assert settings.sentinel_addresses() == [(_pod_dns(sentinels, i), 26379) for i in range(3)]
    assert settings.replicas_to_wait_for() == 1
    # Each sentinel's init container writes its config: quorum 2, watching pod 0, by DNS names.
    pod_spec = sentinels["spec"]["template"]["spec"]
    (init,) = pod_spec["initContainers"]
    assert init["command"] == ["sh", "/scripts/sentinel-conf.sh"]
    assert pod_spec["containers"][0]["command"] == ["redis-server", "/data/sentinel.conf", "--sentinel"]
    for i in range(3):
        pod = f"{sentinels['metadata']['name']}-{i}"
        env = _container_env(init, pod, config)
        written = _sentinel_config(scripts["sentinel-conf.sh"], env, tmp_path / pod)
        _check_sentinel_config(
            written, self=_pod_dns(sentinels, i), master=master, primary=_pod_dns(nodes, 0)
        )
    # The Redis pods: the base Redis's settings, pod 0's name to replicate, their own names to
    # announce, the sentinels (for their role) from the same ConfigMap keys as the clients.
    (container,) = nodes["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "/scripts/start-node.sh"]
    options = _options(container["args"])
    base = _options(_find("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["args"])
    assert {k: v for k, v in options.items() if k in base} == base
    assert options["replicaof"] == [_pod_dns(nodes, 0), "6379"]
    assert options["replica-announce-ip"] == [
        f"$(POD_NAME).{nodes['spec']['serviceName']}.streamq.svc.cluster.local"
    ]
    env = _container_env(container, "redis-ha-1", config)
    assert env["SENTINELS"] == config["STREAMQ_REDIS_SENTINELS"] and env["SENTINEL_MASTER"] == master
    # KEDA reads the queue's length from the primary the sentinels name.
    trigger = _get(docs, "ScaledObject", "streamq-worker")["spec"]["triggers"][0]
    assert trigger["type"] == "redis-sentinel"
    assert trigger["metadata"]["addresses"] == config["STREAMQ_REDIS_SENTINELS"]
    assert trigger["metadata"]["sentinelMaster"] == master
    assert trigger["metadata"]["listName"] == keys.rq_queue(config["STREAMQ_SERVED_NAME"])
    assert "address" not in trigger["metadata"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_redis_ha_overlay_validates(version: str) -> None:
    _validate_documents(_ha_documents(), version)


def test_k8s_redis_ha_overlay_replicates_redis_behind_sentinels(tmp_path: Path) -> None:
    docs = _ha_documents()
    _check_ha_overlay(docs, tmp_path)
    # The same scripts as the compose file's (less the sentinels' start, a container of its own here).
    scripts = _get(docs, "ConfigMap", "redis-ha-scripts")["data"]
    compose = _ha_compose_file()
    assert scripts["start-node.sh"] == compose["x-redis-node-start"]
    assert scripts["sentinel-conf.sh"] + SENTINEL_EXEC + "\n" == compose["x-sentinel-start"]


def test_k8s_redis_ha_pods_take_their_role_from_the_sentinels(tmp_path: Path) -> None:
    docs = _ha_documents()
    script = _get(docs, "ConfigMap", "redis-ha-scripts")["data"]["start-node.sh"]
    nodes = _get(docs, "StatefulSet", "redis-ha")
    args = nodes["spec"]["template"]["spec"]["containers"][0]["args"]
    pod0, pod1 = _pod_dns(nodes, 0), _pod_dns(nodes, 1)
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
    overlay = _overlay()
    overlay["patches"] = [p for p in overlay["patches"] if not p["path"].startswith("delete-")]
    kept = _ha_documents(overlay, tmp_path / "build")  # built outside the raises: it must build
    with pytest.raises(AssertionError):
        _check_ha_overlay(kept, tmp_path)
    scaled = copy.deepcopy(_find("ScaledObject", "streamq-worker"))
    scaled["spec"]["triggers"][0]["type"] = "redis-sentinel"
    ops = yaml.safe_load((HA_OVERLAY / "keda-trigger-patch.yaml").read_text())
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(scaled, ops)
    sentinels = copy.deepcopy(_get(_ha_documents(), "StatefulSet", "redis-sentinel"))
    sentinels["spec"]["template"]["spec"]["initContainer"] = sentinels["spec"]["template"]["spec"].pop(
        "initContainers"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sentinels, K8S_VERSIONS[0], strict=True)


def test_k8s_redis_ha_overlay_builds_with_kustomize() -> None:
    """kustomize builds k8s/redis-ha as read here by hand."""
    _need_kubectl()
    assert _keyed(list(_built(HA_OVERLAY))) == _keyed(_ha_by_hand())
