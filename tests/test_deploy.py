"""The container and the Kubernetes manifests, checked offline and against the app itself.

Every resource is validated against the Kubernetes OpenAPI schemas that kubernetes-validate ships (strict:
an unknown field fails), the ServiceMonitor against the prometheus-operator CRD's schema vendored in
tests/schemas/servicemonitor_v1.json, copied from
https://github.com/datreeio/CRDs-catalog/blob/303a98c77be9fb31961a2f7624a5aa00fc3e3d09/monitoring.coreos.com/servicemonitor_v1.json
The GPU overlay is rendered as `kubectl kustomize` would (its base, JSON 6902 patches, image changes) and
validated too.
No Docker engine runs here, so the Dockerfile is parsed and its promises checked.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi import FastAPI
from starlette.routing import Match

from app.__main__ import AFTER_DRAIN_S
from app.main import create_app
from configs import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
ADAPTER_CONFIG = K8S / "prometheus-adapter" / "adapter-config.yaml"
SERVICEMONITOR_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "servicemonitor_v1.json").read_text())
KUBERNETES_VERSION = "1.33"
# what the renderer below does; anything else in a kustomization would be rendered wrongly, so it fails
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def split_image(reference: str) -> tuple[str, str]:
    """'registry:5000/asr-service:0.1.0' -> ('registry:5000/asr-service', '0.1.0'); the tag may be empty."""
    name, _, tag = reference.rpartition(":")
    return (name, tag) if name and "/" not in tag else (reference, "")


def kustomize_build(directory: Path, read: set[Path]) -> list[dict]:
    """The resources of a kustomization with its JSON 6902 patches and image changes applied; the files it used
    go in ``read``."""
    kustomization_path = directory / "kustomization.yaml"
    kustomization = yaml.safe_load(kustomization_path.read_text())
    read.add(kustomization_path)
    assert set(kustomization) <= KUSTOMIZATION_FIELDS, f"{kustomization_path}: the test cannot render {set(kustomization) - KUSTOMIZATION_FIELDS}"
    documents: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            documents += kustomize_build(path, read)
        else:
            documents += yaml_documents(path)
            read.add(path)
    for patch in kustomization.get("patches", []):
        patch_path = directory / patch["path"]
        read.add(patch_path)
        target = patch["target"]
        group, version = target.get("group"), target["version"]
        api_version = f"{group}/{version}" if group else version
        matched = [i for i, doc in enumerate(documents)
                   if (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == (api_version, target["kind"], target["name"])]
        assert len(matched) == 1, f"{patch_path}: its target matches {len(matched)} resources"
        documents[matched[0]] = jsonpatch.apply_patch(documents[matched[0]], yaml.safe_load(patch_path.read_text()))
    for image in kustomization.get("images", []):  # what `kustomize edit set image NAME=NEW_NAME:NEW_TAG` writes
        assert set(image) <= {"name", "newName", "newTag"}, f"{kustomization_path}: the test cannot render {image}"
        for doc in documents:
            for container in doc["spec"].get("template", {}).get("spec", {}).get("containers", []):
                name, tag = split_image(container["image"])
                if name == image["name"]:
                    name, tag = image.get("newName", name), image.get("newTag", tag)
                    container["image"] = f"{name}:{tag}" if tag else name
    return documents


@dataclass
class Rendering:
    """One `kubectl apply -k` worth of resources, looked up by kind."""

    name: str
    documents: list[dict]

    def one(self, kind: str) -> dict:
        (found,) = [doc for doc in self.documents if doc["kind"] == kind]
        return found

    @property
    def container(self) -> dict:
        (container,) = self.one("Deployment")["spec"]["template"]["spec"]["containers"]
        return container

    def setting(self, field: str) -> float:
        """An ASR_ setting as the pod gets it: its literal env value, else the default in configs/settings.py."""
        for var in self.container["env"]:
            if var["name"] == f"ASR_{field.upper()}" and "value" in var:
                return float(var["value"])
        return float(Settings.model_fields[field].default)


FILES_READ: set[Path] = set()
RENDERINGS = [Rendering("base", kustomize_build(K8S, FILES_READ)),
              Rendering("gpu", kustomize_build(K8S / "overlays" / "gpu", FILES_READ))]
BASE, GPU = RENDERINGS
ADAPTER = Rendering("prometheus-adapter", yaml_documents(ADAPTER_CONFIG))
ALL_DOCUMENTS = [(r.name, doc) for r in [*RENDERINGS, ADAPTER] for doc in r.documents]


def validate(document: dict) -> str:
    """Raises on an invalid resource; says what it was checked against."""
    if document["kind"] == "ServiceMonitor":
        jsonschema.Draft202012Validator(SERVICEMONITOR_SCHEMA).validate(document)
        return "prometheus-operator CRD schema"
    return f"Kubernetes {kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)}, strict"


@pytest.mark.parametrize("source, document", ALL_DOCUMENTS,
                         ids=[f"{source}:{doc['kind']}/{doc['metadata']['name']}" for source, doc in ALL_DOCUMENTS])
def test_manifest_is_valid(source: str, document: dict) -> None:
    print(f"{source}: {document['kind']}/{document['metadata']['name']} -> valid ({validate(document)})")


def test_validation_catches_a_misspelled_field() -> None:
    """The validators are not vacuous: strict schemas refuse a field that Kubernetes would not know."""
    for kind in ("Deployment", "ServiceMonitor", "HorizontalPodAutoscaler"):
        document = copy.deepcopy(BASE.one(kind))
        document["spec"]["terminationGracePeriod"] = 45
        with pytest.raises(jsonschema.ValidationError):
            validate(document)


def test_every_manifest_file_is_checked() -> None:
    files = set(K8S.rglob("*.yaml"))
    assert files == FILES_READ | {ADAPTER_CONFIG}, f"not rendered by any kustomization: {files - FILES_READ - {ADAPTER_CONFIG}}"


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and selector.items() <= labels.items()


@pytest.mark.parametrize("rendering", RENDERINGS, ids=lambda r: r.name)
def test_resources_point_at_each_other(rendering: Rendering) -> None:
    deployment, service = rendering.one("Deployment"), rendering.one("Service")
    monitor, pdb, hpa = rendering.one("ServiceMonitor"), rendering.one("PodDisruptionBudget"), rendering.one("HorizontalPodAutoscaler")
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert labels_match(service["spec"]["selector"], pod_labels)
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    for spread in pod["spec"].get("topologySpreadConstraints", []):
        assert labels_match(spread["labelSelector"]["matchLabels"], pod_labels)
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])

    (container_port,) = rendering.container["ports"]
    assert container_port["containerPort"] == rendering.setting("port")
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {container_port["name"], container_port["containerPort"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}

    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return create_app()


def routes_get(app: FastAPI, path: str) -> bool:
    """Whether one of the app's routes answers GET ``path`` (not the 404 of no route)."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "query_string": b"", "headers": []}
    return any(route.matches(scope)[0] is Match.FULL for route in app.routes)


@pytest.mark.parametrize("rendering", RENDERINGS, ids=lambda r: r.name)
def test_probes_and_scrapes_hit_the_app(rendering: Rendering, app: FastAPI) -> None:
    container = rendering.container
    port_name = container["ports"][0]["name"]
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"  # answers while the model loads
    assert probes["readinessProbe"]["path"] == "/readyz"  # 503 while loading and draining
    assert all(probe["port"] == port_name and routes_get(app, probe["path"]) for probe in probes.values())
    assert all(routes_get(app, endpoint["path"]) for endpoint in rendering.one("ServiceMonitor")["spec"]["endpoints"])
    assert not routes_get(app, "/no-such-path")


@pytest.mark.parametrize("rendering", RENDERINGS, ids=lambda r: r.name)
def test_grace_period_covers_the_drain(rendering: Rendering) -> None:
    """Kubernetes kills the pod terminationGracePeriodSeconds after preStop starts: the sleep, the drain
    (ASR_SHUTDOWN_TIMEOUT_S) and uvicorn's last seconds must fit, or streams lose their last final."""
    pod = rendering.one("Deployment")["spec"]["template"]["spec"]
    sleep, seconds = rendering.container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    needed = float(seconds) + rendering.setting("shutdown_timeout_s") + AFTER_DRAIN_S
    assert pod["terminationGracePeriodSeconds"] > needed, f"grace {pod['terminationGracePeriodSeconds']} s, the shutdown takes up to {needed} s"


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER.one("ConfigMap")["data"]["config.yaml"])["rules"]


def served_metrics(rule: dict) -> dict[str, str]:
    """Series name -> the name prometheus-adapter serves it as (its name.matches / name.as, Go's ${n})."""
    (names,) = re.findall(r'__name__=~"([^"]+)"', rule["seriesQuery"])
    replacement = re.sub(r"\$\{(\d+)\}", r"\\g<\1>", rule["name"]["as"])
    return {series: re.sub(rule["name"]["matches"], replacement, series) for series in names.split("|")}


def test_adapter_rules_serve_per_pod_maxima() -> None:
    for rule in adapter_rules():
        assert 'namespace!=""' in rule["seriesQuery"] and 'pod!=""' in rule["seriesQuery"]
        assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}
        # max over the model and stage labels: a pod is as late as its latest queue
        assert rule["metricsQuery"] == "max by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})"


@pytest.mark.parametrize("rendering", RENDERINGS, ids=lambda r: r.name)
def test_autoscaler_asks_for_what_the_adapter_serves(rendering: Rendering) -> None:
    hpa = rendering.one("HorizontalPodAutoscaler")["spec"]
    targets = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in hpa["metrics"]}
    served = {name for rule in adapter_rules() for name in served_metrics(rule).values()}
    assert set(targets) == served
    # scale before the pod refuses: stream handshakes past ASR_STREAM_MAX_SESSIONS, REST past ASR_ADMISSION_MAX_WAIT_S
    assert targets["asr_streams_active"] < rendering.setting("stream_max_sessions")
    assert targets["asr_admission_predicted_wait_seconds"] < rendering.setting("admission_max_wait_s")
    assert hpa["minReplicas"] >= 2
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300  # long streams are not flapped


def test_gpu_overlay_asks_for_a_gpu() -> None:
    limits = GPU.container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1 and GPU.container["image"].endswith("-cuda")
    assert "nvidia.com/gpu" not in BASE.container["resources"]["limits"]
    pod = GPU.one("Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and pod["tolerations"]


# The Dockerfile: instructions in order, each stage with the stage (or image) it starts from.

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]


def dockerfile_stages(text: str) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            base, *named = re.split(r"\s+as\s+", arguments.strip(), maxsplit=1, flags=re.IGNORECASE)
            name = named[0] if named else str(len(stages))
            stage = stages[name] = Stage(name, base, [])
        elif stages:
            stage.instructions.append((instruction.upper(), arguments.strip()))
    return stages


DOCKERFILE = dockerfile_stages((ROOT / "Dockerfile").read_text())
DOCKERIGNORE = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]


def effective(stages: dict[str, Stage], target: str, instruction: str) -> str | None:
    """The last ``instruction`` in force in ``target``: its own, else inherited from the stage it starts from."""
    stage = stages[target]
    own = [arguments for name, arguments in stage.instructions if name == instruction]
    if own:
        return own[-1]
    return effective(stages, stage.base, instruction) if stage.base in stages else None


def docker_ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (or a folder above it) out of the build context."""
    assert not any(p.startswith("!") for p in DOCKERIGNORE), "exceptions are beyond this matcher"
    parts = path.split("/")
    for pattern in DOCKERIGNORE:
        anywhere = pattern.startswith("**/")
        for end in range(1, len(parts) + 1):
            starts = range(end) if anywhere else [0]
            if any(fnmatch.fnmatchcase("/".join(parts[start:end]), pattern.removeprefix("**/")) for start in starts):
                return True
    return False


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_dockerfile_target(target: str) -> None:
    user = effective(DOCKERFILE, target, "USER")
    assert user is not None and all(part.isdigit() for part in user.split(":")) and int(user.split(":")[0]) > 0, \
        "a numeric non-root uid, so that runAsNonRoot can verify it"
    healthcheck = json.loads(effective(DOCKERFILE, target, "HEALTHCHECK").split(" CMD ", 1)[1])  # exec form, valid JSON
    assert healthcheck[0] == "python" and "/healthz" in healthcheck[-1]
    assert effective(DOCKERFILE, target, "STOPSIGNAL") == "SIGTERM"
    assert json.loads(effective(DOCKERFILE, target, "CMD")) == ["python", "-m", "app"]
    # python -m app runs the tree copied to the working directory, app/static included
    assert effective(DOCKERFILE, target, "WORKDIR") == "/srv"
    assert ("COPY", "--from=source /srv /srv") in DOCKERFILE[target].instructions
    installs = " ".join(arguments for name, arguments in DOCKERFILE[target].instructions if name == "RUN")
    assert "torch==${TORCH_VERSION} torchaudio==${TORCH_VERSION}" in installs


def test_dockerfile_builds_cpu_by_default_on_the_pinned_torch() -> None:
    assert list(DOCKERFILE)[-1] == "cpu"
    dockerfile_args = dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(dep.split("==") for dep in dependencies if dep.split("==")[0] in ("torch", "torchaudio"))
    assert pins == {"torch": dockerfile_args["TORCH_VERSION"], "torchaudio": dockerfile_args["TORCH_VERSION"]}


def test_dockerfile_copies_what_exists() -> None:
    copies = [arguments.split() for stage in DOCKERFILE.values() for name, arguments in stage.instructions
              if name == "COPY" and not arguments.startswith("--from=")]
    sources = [source for arguments in copies for source in arguments[:-1]]
    assert "app" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
        assert not docker_ignored(source), f"COPY {source}: excluded by .dockerignore"
    # the page's files travel with app/, unless .dockerignore drops them
    for path in (ROOT / "app").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            assert not docker_ignored(str(path.relative_to(ROOT))), f"{path} would be missing from the image"
    assert docker_ignored(".venv") and docker_ignored(".env") and docker_ignored("app/__pycache__/main.cpython-311.pyc")
