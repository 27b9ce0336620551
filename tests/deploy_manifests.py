"""The deployment files as the tests read them: docker-compose's merged config, the k8s manifests,
and the checks of a manifest against its schema (Kubernetes' own; KEDA's CRD schema for the
ScaledObject).

k8s/base is the single-Redis deployment; k8s/vllm and k8s/redis-ha are overlays of it, beside it
(kustomize refuses an overlay inside its base's folder). The overlays are read as `kubectl
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

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
BASE = K8S / "base"
VLLM_OVERLAY = K8S / "vllm"
HA_OVERLAY = K8S / "redis-ha"
HA_COMPOSE = ROOT / "docker-compose.ha.yml"
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-scaledobject-v1alpha1.yaml"
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())  # oldest we target, newest known
KUSTOMIZE_MIN = (5, 0)  # what these kustomizations are built with (kubectl 1.27 and later)

Doc = dict[str, Any]


# ----- docker-compose -----------------------------------------------------------------------


def compose(*args: str, file: Path = ROOT / "docker-compose.yml") -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it: apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMQ_", "COMPOSE_"))}
    return subprocess.run(
        [exe, "-f", str(file), *args], capture_output=True, text=True, env=env, timeout=60, cwd=file.parent
    )


def compose_ha(*args: str, override: Path = HA_COMPOSE) -> subprocess.CompletedProcess[str]:
    """docker-compose on docker-compose.yml with the override merged over it."""
    return compose("-f", str(override), *args)


def ha_compose_file() -> dict[str, Any]:
    """docker-compose.ha.yml as YAML reads it (anchors resolved, nothing interpolated), `$$` unescaped."""
    return dict(yaml.safe_load(HA_COMPOSE.read_text().replace("$$", "$")))


def merged_ha_services(override: Path = HA_COMPOSE) -> dict[str, Any]:
    """The merged services, every profile's, with compose's `$$` unescaped as a container sees it."""
    result = compose_ha("--profile", "cpu", "--profile", "vllm", "config", override=override)
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout.replace("$$", "$"))["services"])


def redis_options(args: list[str]) -> dict[str, list[str]]:
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


# ----- Kubernetes: the base's files ---------------------------------------------------------


def kustomization(folder: Path = BASE) -> dict[str, Any]:
    return dict(yaml.safe_load((folder / "kustomization.yaml").read_text()))


def base_documents() -> list[tuple[str, Doc]]:
    """The base's manifests as its files hold them (before its `images:`), each with its file."""
    docs = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((BASE / name).read_text()):
            if doc:
                docs.append((name, doc))
    return docs


def find_base(kind: str, name: str) -> Doc:
    """A manifest of the base, as its file holds it."""
    return next(d for _f, d in base_documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def find_doc(docs: list[Doc], kind: str, name: str) -> Doc:
    """The one manifest of that kind and name among docs."""
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def keyed(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(by_key) == len(docs), "two manifests of the same kind and name"
    return by_key


# ----- Kubernetes: schemas ------------------------------------------------------------------


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


def validate_scaled_object(doc: Doc) -> None:
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.validate(doc, _strict(yaml.safe_load(KEDA_SCHEMA.read_text())))


def validate_document(doc: Doc, version: str, where: str = "") -> None:
    """A manifest against its schema, in the namespace streamq; `where` (its file, say) leads the
    message of a failure."""
    lead = f"{where}: " if where else ""
    if doc["kind"] == "ScaledObject":
        validate_scaled_object(doc)
    else:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{lead}{doc['kind']} {doc['metadata']['name']}: {exc.message}")
    namespace = doc["metadata"].get("namespace", "streamq")
    assert namespace == "streamq" or doc["kind"] == "Namespace", (
        f"{lead}{doc['kind']} {doc['metadata']['name']} in the namespace {namespace}"
    )


def validate_documents(docs: list[Doc], version: str) -> None:
    """Every manifest against its schema, in the namespace streamq."""
    for doc in docs:
        validate_document(doc, version)


# ----- Kubernetes: kustomize's builds -------------------------------------------------------


@functools.cache
def kubectl() -> tuple[str | None, str]:
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


def need_kubectl() -> str:
    exe, why = kubectl()
    if exe is None:
        pytest.skip(why)
    return exe


def kustomize(folder: Path) -> subprocess.CompletedProcess[str]:
    """`kubectl kustomize folder` (offline: it builds, it applies nothing)."""
    return subprocess.run(
        [need_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


@functools.cache
def built(folder: Path) -> tuple[Doc, ...]:
    """`kubectl kustomize folder`'s manifests, built once (not to be changed: see build)."""
    result = kustomize(folder)
    assert result.returncode == 0, f"kubectl kustomize {folder}: {result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def build(folder: Path) -> list[Doc] | None:
    """The manifests `kubectl kustomize folder` gives, or None where there is no kubectl for it."""
    if kubectl()[0] is None:
        return None
    return copy.deepcopy(list(built(folder)))


def overlay_copy(overlay: Path, spec: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of an overlay with another kustomization.yaml (spec), on the repository's base
    (kustomize takes a relative path to it only)."""
    copied = tmp_path / overlay.name
    shutil.copytree(overlay, copied)
    spec = copy.deepcopy(spec)
    assert spec["resources"][0] == "../base"
    spec["resources"][0] = os.path.relpath(BASE, copied)
    (copied / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return copied


# ----- Kubernetes: the builds read by hand --------------------------------------------------


def _set_images(docs: list[Doc], images: list[dict[str, str]]) -> None:
    """A kustomization's `images:` as kustomize applies them: a container's image of that name
    (whatever its tag) gets the new name and tag."""
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
            name, _, tag = container["image"].partition(":")
            for image in images:
                if image["name"] == name:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def _index(docs: list[Doc], kind: str, name: str) -> int:
    (i,) = [i for i, d in enumerate(docs) if d["kind"] == kind and d["metadata"]["name"] == name]
    return i


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch of maps (the overlay patches no lists this way)."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(base)
    for key, value in patch.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def base_by_hand() -> list[Doc]:
    """k8s/base as kustomize builds it, read by hand: its manifests, then its `images:`."""
    docs = [copy.deepcopy(d) for _f, d in base_documents()]
    _set_images(docs, kustomization().get("images", []))
    return docs


def vllm_by_hand() -> list[Doc]:
    """k8s/vllm as kustomize builds it, read by hand: the base, its worker Deployment under the
    overlay's JSON 6902 patch, then the overlay's `images:`."""
    overlay = kustomization(VLLM_OVERLAY)
    assert overlay["resources"] == ["../base"]
    (patch,) = overlay["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "streamq-worker"}
    ops = yaml.safe_load((VLLM_OVERLAY / patch["path"]).read_text())
    docs = base_by_hand()
    i = _index(docs, "Deployment", "streamq-worker")
    docs[i] = jsonpatch.apply_patch(docs[i], ops)
    _set_images(docs, overlay["images"])
    return docs


def vllm_documents() -> list[Doc]:
    """k8s/vllm as `kubectl kustomize` builds it (by hand without kubectl)."""
    return build(VLLM_OVERLAY) or vllm_by_hand()


def ha_by_hand(overlay: dict[str, Any] | None = None) -> list[Doc]:
    """k8s/redis-ha as kustomize builds it, read by hand: the base, its own resources, then its
    patches (a `$patch: delete`, a strategic merge of a map, or a JSON 6902 patch of a target)."""
    overlay = kustomization(HA_OVERLAY) if overlay is None else overlay
    assert overlay["resources"][0] == "../base"
    docs = base_by_hand()
    for name in overlay["resources"][1:]:
        docs += [d for d in yaml.safe_load_all((HA_OVERLAY / name).read_text()) if d]
    for patch in overlay["patches"]:
        text = (HA_OVERLAY / patch["path"]).read_text()
        if "target" in patch:
            target = patch["target"]
            i = _index(docs, target["kind"], target["name"])
            docs[i] = jsonpatch.apply_patch(docs[i], yaml.safe_load(text))
            continue
        for doc in yaml.safe_load_all(text):
            i = _index(docs, doc["kind"], doc["metadata"]["name"])
            if doc.get("$patch") == "delete":
                del docs[i]
            else:
                docs[i] = _merge(docs[i], doc)
    _set_images(docs, overlay.get("images", []))
    return docs


def ha_documents(overlay: dict[str, Any] | None = None, tmp_path: Path | None = None) -> list[Doc]:
    """k8s/redis-ha (or a copy of it with another kustomization.yaml, built in tmp_path) as `kubectl
    kustomize` builds it; by hand without kubectl."""
    if kubectl()[0] is None:
        return ha_by_hand(overlay)
    if overlay is None:
        return build(HA_OVERLAY) or []
    assert tmp_path is not None
    result = kustomize(overlay_copy(HA_OVERLAY, overlay, tmp_path))
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


# ----- Kubernetes: pods as the kubelet runs them --------------------------------------------


def pod_dns(statefulset: Doc, ordinal: int) -> str:
    meta = statefulset["metadata"]
    return (
        f"{meta['name']}-{ordinal}.{statefulset['spec']['serviceName']}.{meta['namespace']}.svc.cluster.local"
    )


def container_env(container: dict[str, Any], pod: str, config: dict[str, str]) -> dict[str, str]:
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
