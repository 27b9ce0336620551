"""The deployment files: docker-compose.yml validates with docker-compose, every k8s/base manifest
validates against its schema (Kubernetes' own; KEDA's CRD schema for the ScaledObject), the
manifests agree with the code (queue key, drain time, probes), and so does the k8s/vllm overlay
(its GPUs). How the files are read and built: tests/deploy_manifests.py. The Redis HA variants
(docker-compose.ha.yml, k8s/redis-ha): tests/test_deploy_redis_ha.py."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from pydantic import ValidationError
from rq.queue import Queue

from shared import keys
from shared.settings import Settings
from tests.deploy_manifests import (
    BASE,
    HA_OVERLAY,
    K8S,
    K8S_VERSIONS,
    ROOT,
    VLLM_OVERLAY,
    base_by_hand,
    base_documents,
    build,
    built,
    compose,
    find_base,
    find_doc,
    keyed,
    kubectl,
    kustomization,
    kustomize,
    need_kubectl,
    overlay_copy,
    validate_document,
    validate_documents,
    validate_scaled_object,
    vllm_by_hand,
    vllm_documents,
)

# ----- docker-compose -----------------------------------------------------------------------


def test_compose_file_validates() -> None:
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_validation_catches_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: a service with an unknown key is refused."""
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    spec["services"]["api"]["healthcheck"]["tset"] = spec["services"]["api"]["healthcheck"].pop("test")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(spec))
    result = compose("config", "-q", file=broken)
    assert result.returncode != 0 and "tset" in result.stderr


def test_compose_services_as_documented() -> None:
    result = compose("--profile", "cpu", "config")
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


# ----- Kubernetes: k8s/base ---------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert kustomization()["namespace"] == "streamq"


def test_k8s_layout_keeps_the_overlays_beside_their_base() -> None:
    """k8s/ holds the base and its overlays side by side (kustomize refuses an overlay inside its
    base's folder: "cycle detected"); k8s/kustomization.yaml is k8s/base, for `kubectl apply -k k8s/`."""
    assert {p.name for p in K8S.iterdir()} == {"kustomization.yaml", "base", "vllm", "redis-ha"}
    top = kustomization(K8S)
    assert top["resources"] == ["base"] and set(top) == {"apiVersion", "kind", "resources"}
    for overlay in (VLLM_OVERLAY, HA_OVERLAY):
        assert kustomization(overlay)["resources"][0] == "../base", overlay.name


def test_k8s_base_builds_with_kustomize() -> None:
    """kustomize builds k8s/base, and k8s/ as the same, as read here by hand."""
    need_kubectl()
    base = keyed(list(built(BASE)))
    assert base == keyed(base_by_hand())
    assert keyed(list(built(K8S))) == base


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_k8s_manifest_validates(version: str) -> None:
    kinds = []
    for name, doc in base_documents():
        validate_document(doc, version, where=name)
        kinds.append(doc["kind"])
    expected = {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Deployment", "Service"}
    expected |= {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ScaledObject", "PersistentVolumeClaim"}
    assert set(kinds) == expected


def test_validators_refuse_broken_manifests() -> None:
    """The validation above can fail: a misspelt field is refused by either schema."""
    deployment = copy.deepcopy(find_base("Deployment", "streamq-api"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    scaled = copy.deepcopy(find_base("ScaledObject", "streamq-worker"))
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        validate_scaled_object(scaled)
    scaled = copy.deepcopy(find_base("ScaledObject", "streamq-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 4  # trigger metadata are strings
    with pytest.raises(jsonschema.ValidationError):
        validate_scaled_object(scaled)


def test_scaled_object_targets_the_queue_the_code_uses() -> None:
    config = find_base("ConfigMap", "streamq-config")["data"]
    served = config["STREAMQ_SERVED_NAME"]
    scaled = find_base("ScaledObject", "streamq-worker")["spec"]
    trigger, load_trigger = scaled["triggers"]
    assert trigger["type"] == "redis"
    # The list the workers take jobs from: streamq's key function, and RQ's own name for it.
    assert trigger["metadata"]["listName"] == keys.rq_queue(served)
    rq_queue = Queue(keys.queue_name(served), connection=redis.Redis())  # never connects: a key's name
    assert trigger["metadata"]["listName"] == rq_queue.key
    assert served in config["STREAMQ_MODELS"].split(",")  # the fronts wait for this model
    # It scales the worker Deployment, and reads the Redis the workers use.
    worker = find_base("Deployment", "streamq-worker")
    assert scaled["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    redis_url = find_base("Secret", "streamq-secrets")["stringData"]["STREAMQ_REDIS_URL"]
    assert redis_url.startswith(f"redis://{trigger['metadata']['address']}/")
    assert redis_url.endswith(f"/{trigger['metadata']['databaseIndex']}")
    redis_service = find_base("Service", "redis")
    host = f"{redis_service['metadata']['name']}.{redis_service['metadata']['namespace']}.svc.cluster.local"
    assert trigger["metadata"]["address"] == f"{host}:{redis_service['spec']['ports'][0]['port']}"
    assert 0 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    # The second trigger asks a front (through its Service) for the model's waiting + running
    # jobs, one worker per STREAMQ_SLOTS of them.
    api_service = find_base("Service", "streamq-api")
    api_host = f"{api_service['metadata']['name']}.{api_service['metadata']['namespace']}.svc.cluster.local"
    assert api_service["spec"]["ports"][0]["port"] == 80
    assert load_trigger["type"] == "metrics-api"
    assert load_trigger["metadata"]["url"] == f"http://{api_host}/scaling?model={served}"
    assert load_trigger["metadata"]["valueLocation"] == "load"
    assert load_trigger["metadata"]["targetValue"] == config["STREAMQ_SLOTS"]
    assert config.get("STREAMQ_SCALE_TO_ZERO") == "1" or scaled["minReplicaCount"] > 0


def test_a_stopping_front_is_out_of_the_service_before_it_stops_listening() -> None:
    """A front closes its listener at SIGTERM, while the Service's endpoints (and an ingress's
    upstreams) still send it new connections for a few seconds: refused, a 502 no proxy retries
    for a POST. A preStop wait holds the signal back; the grace period has room for it and the
    front's own STREAMQ_SHUTDOWN_GRACE."""
    pod = find_base("Deployment", "streamq-api")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    waited = container["lifecycle"]["preStop"]["exec"]["command"]
    assert waited[0] == "sleep" and float(waited[1]) >= 5
    grace = Settings().shutdown_grace
    assert pod["terminationGracePeriodSeconds"] >= float(waited[1]) + grace + 5


def test_worker_deployment_has_a_gpu_a_model_cache_and_time_to_drain() -> None:
    config = find_base("ConfigMap", "streamq-config")["data"]
    Settings(**{k.removeprefix("STREAMQ_").lower(): v for k, v in config.items() if k.startswith("STREAMQ_")})
    pod = find_base("Deployment", "streamq-worker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= float(config["STREAMQ_DRAIN_SECONDS"]) + 10
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["models"] == config["HF_HOME"]
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    claim = models["persistentVolumeClaim"]["claimName"]
    assert find_base("PersistentVolumeClaim", claim)
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    assert port == int(config["STREAMQ_METRICS_PORT"])
    # Of the Secret, a worker gets the Redis URL only (no API keys).
    assert all("secretRef" not in source for source in container["envFrom"])
    (redis_url,) = [e for e in container["env"] if e["name"] == "STREAMQ_REDIS_URL"]
    assert redis_url["valueFrom"]["secretKeyRef"] == {"name": "streamq-secrets", "key": "STREAMQ_REDIS_URL"}


def test_front_is_ready_on_readyz_and_disruption_bounded() -> None:
    api = find_base("Deployment", "streamq-api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"secretRef": {"name": "streamq-secrets"}} in container["envFrom"]
    labels = api["spec"]["selector"]["matchLabels"]
    assert find_base("PodDisruptionBudget", "streamq-api")["spec"]["selector"]["matchLabels"] == labels
    assert find_base("Service", "streamq-api")["spec"]["selector"] == labels
    hpa = find_base("HorizontalPodAutoscaler", "streamq-api")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "streamq-api" and hpa["minReplicas"] >= 2
    # A read-only root, and a writable temporary directory where `streamq api --workers N` makes
    # the one its processes share their metrics through (tempfile's default, /tmp).
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in api["spec"]["template"]["spec"].get("volumes", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]], mounts


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
    result = compose("--profile", "vllm", "config")
    assert result.returncode == 0, result.stderr
    worker = yaml.safe_load(result.stdout)["services"]["worker-vllm"]
    assert worker["build"]["target"] == "worker-vllm" and worker["profiles"] == ["vllm"]
    env = worker["environment"]
    assert env["STREAMQ_ENGINE"] == "vllm" and env["STREAMQ_DEVICE"] == "cuda"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(device["device_ids"]) == int(env["STREAMQ_TENSOR_PARALLEL_SIZE"]) == 2
    Settings(engine=env["STREAMQ_ENGINE"], tensor_parallel_size=env["STREAMQ_TENSOR_PARALLEL_SIZE"])


def test_every_compose_services_environment_starts_its_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each service's STREAMQ_ settings, as compose resolves them with nothing set in the shell
    (`${X:-}` is an empty string), are settings its process starts with: an empty optional one
    is unset (STREAMQ_KV_CACHE_GIB= stopped the vLLM worker)."""
    result = compose("--profile", "cpu", "--profile", "vllm", "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert "worker-vllm" in services
    for name, service in services.items():
        env = service.get("environment") or {}
        with monkeypatch.context() as patch:
            for key in [k for k in os.environ if k.startswith("STREAMQ_")]:
                patch.delenv(key)
            for key, value in env.items():
                if key.startswith("STREAMQ_") and value is not None:
                    patch.setenv(key, str(value))
            try:
                Settings()
            except ValidationError as exc:
                raise AssertionError(f"{name}: {exc}") from None


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_vllm_overlay_validates_and_matches_its_gpus(version: str) -> None:
    docs = vllm_documents()
    validate_documents(docs, version)
    deployment = find_doc(docs, "Deployment", "streamq-worker")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STREAMQ_ENGINE"] == "vllm" and env["STREAMQ_DEVICE"] == "cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["STREAMQ_TENSOR_PARALLEL_SIZE"])
    (image,) = kustomization(VLLM_OVERLAY)["images"]
    assert image["name"] == "streamq-worker-vllm"
    assert container["image"] == f"{image['newName']}:{image['newTag']}"
    # Only the worker Deployment differs from the base.
    base = keyed(build(BASE) or base_by_hand())
    changed = {key for key, doc in keyed(docs).items() if base.get(key) != doc}
    assert changed == {("Deployment", "streamq-worker")} and keyed(docs).keys() == base.keys()


def test_k8s_vllm_overlay_builds_with_kustomize() -> None:
    """kustomize builds k8s/vllm as read here by hand."""
    need_kubectl()
    assert keyed(list(built(VLLM_OVERLAY))) == keyed(vllm_by_hand())


def test_k8s_vllm_overlay_check_can_fail(tmp_path: Path) -> None:
    """A patch op on a path the base lacks is refused (by hand, and by kustomize where kubectl is
    there), so a base change cannot leave the patch stale."""
    stale = [{"op": "replace", "path": "/spec/template/spec/volumes/7/emptyDir/sizeLimit", "value": "1Gi"}]
    with pytest.raises((jsonpatch.JsonPatchConflict, jsonpatch.JsonPointerException)):
        jsonpatch.apply_patch(find_base("Deployment", "streamq-worker"), stale)
    if kubectl()[0] is None:
        return
    copied = overlay_copy(VLLM_OVERLAY, kustomization(VLLM_OVERLAY), tmp_path)
    (patch,) = kustomization(VLLM_OVERLAY)["patches"]
    ops = yaml.safe_load((VLLM_OVERLAY / patch["path"]).read_text())
    (copied / patch["path"]).write_text(yaml.safe_dump([*ops, *stale]))
    result = kustomize(copied)
    assert result.returncode != 0 and "/volumes/7/emptyDir/sizeLimit" in result.stderr
