"""The cluster configs (cluster/), the image (docker/) and pyproject.toml agree, and stay safe.

No cluster, no network, no Docker: Ray's own offline validation of the launcher YAML, plus static
checks of the KubeRay manifests, the Dockerfile and the pinned requirements. A few seconds.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
REQUIREMENTS = ROOT / "docker" / "requirements.txt"
APP_DIR = "/home/ray/emergence-ray"  # where docker/Dockerfile puts the package and jobs/

LAUNCHER_FILES = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_FILES = sorted(KUBERAY.glob("*.yaml"))
RAY_VERSION = ray.__version__
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEPENDENCIES = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
REQUIRES_PYTHON = Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier
PUBLIC_SERVICE_TYPES = {"LoadBalancer", "NodePort"}


def _python_tag() -> str:
    """The pyXY tag of the oldest Python that requires-python allows (what the image uses)."""
    for minor in range(8, 30):
        if REQUIRES_PYTHON.contains(f"3.{minor}"):
            return f"py3{minor}"
    raise AssertionError(f"requires-python {REQUIRES_PYTHON} allows no Python 3.x")


PYTHON_TAG = _python_tag()


def _image_tag(image: str) -> str:
    name = image.split("@", 1)[0]
    assert ":" in name.rsplit("/", 1)[-1], f"image {image!r} has no tag: pin one"
    return name.rsplit(":", 1)[1]


def _ray_requirement() -> Requirement:
    (req,) = [r for r in DEPENDENCIES if canonicalize_name(r.name) == "ray"]
    return req


# ----------------------------------------------------------------------- versions in pyproject


def test_pyproject_ray_pin_matches_installed_ray():
    spec = _ray_requirement().specifier
    assert spec.contains(RAY_VERSION), (
        f"pyproject ray{spec} excludes the installed ray {RAY_VERSION}"
    )
    installed = Version(RAY_VERSION)
    lower = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
    assert lower and all((v.major, v.minor) == (installed.major, installed.minor) for v in lower), (
        f"pyproject pins ray{spec}; the installed ray is {RAY_VERSION}: same major.minor expected"
    )
    assert PYTHON_TAG == "py311", f"requires-python {REQUIRES_PYTHON}: the image tags use py311"


# ---------------------------------------------------------------------- cluster launcher YAML


def _launcher(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _start_commands(cfg: dict) -> list[str]:
    return [
        c
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in cfg.get(key, [])
    ]


def test_there_is_a_launcher_config():
    assert LAUNCHER_FILES, "no cluster/*.yaml"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_launcher(path)))  # offline: no cloud API call
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    assert workers, "no worker node type"
    assert any(v["max_workers"] > v.get("min_workers", 0) for v in workers.values()), (
        "no autoscaling worker type (max_workers > min_workers)"
    )
    # Ray's AWS defaults install a nightly Ray in setup_commands unless the config sets them.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        for cmd in prepared[key]:
            assert not re.search(
                r"pip3? install\b[^;&|]*[\s'\"]ray[\[=<>~!\s'\"]|pip3? install\b.*ray-wheels",
                cmd + " ",
            ), f"{key} installs another Ray: {cmd!r}"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_keeps_dashboard_private_and_token_auth_on(path):
    cfg = _launcher(path)
    text = path.read_text()
    assert "0.0.0.0" not in text, (
        f"{path.name}: nothing may bind to 0.0.0.0 (the dashboard runs code)"
    )
    head = " ".join(cfg["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head), (
        "head start: --dashboard-host=127.0.0.1 (reach it with `ray dashboard CONFIG`)"
    )
    starts = [c for c in _start_commands(cfg) if re.search(r"\bray start\b", c)]
    assert any("--head" in c for c in starts) and any("--address" in c for c in starts)
    for cmd in starts:
        assert re.search(r"(^|[\s;])RAY_AUTH_MODE=token\s+ray start\b", cmd), (
            f"ray start without RAY_AUTH_MODE=token in its environment: {cmd!r}"
        )
    docker = cfg.get("docker") or {}
    assert any("RAY_AUTH_MODE=token" in opt for opt in docker.get("run_options", [])), (
        "docker.run_options: --env RAY_AUTH_MODE=token (jobs and `ray exec` shells need it too)"
    )
    # Every node needs the same token: the local one travels in file_mounts.
    assert "~/.ray/auth_token" in cfg.get("file_mounts", {}), (
        "file_mounts: the auth token for every node"
    )


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_image_pins_ray_and_python(path):
    cfg = _launcher(path)
    images = [cfg["docker"]["image"]] + [
        cfg["docker"][k] for k in ("head_image", "worker_image") if k in cfg["docker"]
    ]
    images += [
        t["docker"][k]
        for t in cfg["available_node_types"].values()
        if "docker" in t
        for k in ("image", "head_image", "worker_image")
        if k in t["docker"]
    ]
    for image in images:
        tag = _image_tag(image)
        assert RAY_VERSION in tag and PYTHON_TAG in tag, (
            f"{image}: the tag must name ray {RAY_VERSION} and {PYTHON_TAG} "
            "(the image built from docker/Dockerfile)"
        )


# ---------------------------------------------------------------------------- KubeRay manifests


def _kuberay_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in KUBERAY_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


KUBERAY_DOCS = _kuberay_docs()
RAY_DOCS = [(name, d) for name, d in KUBERAY_DOCS if d.get("apiVersion", "").startswith("ray.io/")]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(doc)
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [
        (f"worker group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])
    ]
    if doc["kind"] == "RayJob" and doc["spec"].get("submitterPodTemplate"):
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return out


def _containers(template: dict) -> list[dict]:
    pod = template.get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def _doc_id(item) -> str:
    name, doc = item
    return f"{name}:{doc.get('kind')}"


def test_kuberay_manifests_exist_and_are_ray_resources():
    kinds = {d["kind"] for _, d in RAY_DOCS}
    assert {"RayCluster", "RayJob"} <= kinds, (
        f"expected a RayCluster and a RayJob under cluster/kuberay, got {kinds}"
    )
    for name, doc in KUBERAY_DOCS:
        kind = doc.get("kind")
        assert kind not in {"Ingress", "Gateway", "HTTPRoute", "Route", "IngressRoute"}, (
            f"{name}: {kind} would expose the Ray dashboard / Jobs API"
        )
        if kind == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") not in PUBLIC_SERVICE_TYPES, (
                f"{name}: Service {doc['metadata']['name']} is publicly reachable"
            )
        elif doc.get("apiVersion", "").startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1", (
                f"{name}: apiVersion {doc['apiVersion']}, expected ray.io/v1"
            )
            assert kind in {"RayCluster", "RayJob"}, f"{name}: unexpected kind {kind}"
        else:
            assert kind in {"Secret", "ServiceAccount", "ConfigMap", "NetworkPolicy"}, (
                f"{name}: unexpected {doc.get('apiVersion')} {kind}"
            )


@pytest.mark.parametrize("item", RAY_DOCS, ids=_doc_id)
def test_kuberay_cluster_shape_and_versions(item):
    name, doc = item
    spec = _cluster_spec(doc)
    assert spec.get("rayVersion") == RAY_VERSION, (
        f"{name}: rayVersion {spec.get('rayVersion')!r} != {RAY_VERSION}"
    )
    head = spec["headGroupSpec"]
    assert _containers(head["template"]), f"{name}: head group has no container"
    workers = spec.get("workerGroupSpecs") or []
    assert workers, f"{name}: no worker group"
    for group in workers:
        assert _containers(group["template"]), (
            f"{name}: worker group {group.get('groupName')} has no container"
        )
    for where, template in _pod_templates(doc):
        for c in _containers(template):
            tag = _image_tag(c["image"])
            assert RAY_VERSION in tag and PYTHON_TAG in tag, (
                f"{name} {where} {c['name']}: image {c['image']} must pin "
                f"ray {RAY_VERSION} and {PYTHON_TAG}"
            )


@pytest.mark.parametrize("item", RAY_DOCS, ids=_doc_id)
def test_kuberay_gpu_workers_request_gpus(item):
    name, doc = item
    groups = _cluster_spec(doc)["workerGroupSpecs"]
    gpu_groups = []
    for group in groups:
        gpus = [
            c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            for c in _containers(group["template"])
        ]
        has_gpu = any(g is not None and int(g) >= 1 for g in gpus)
        if "gpu" in group["groupName"].lower():
            assert has_gpu, f"{name}: worker group {group['groupName']} has no nvidia.com/gpu limit"
        if has_gpu:
            gpu_groups.append(group)
            for c in _containers(group["template"]):
                res = c.get("resources", {})
                if "nvidia.com/gpu" in res.get("requests", {}):
                    assert str(res["requests"]["nvidia.com/gpu"]) == str(
                        res["limits"]["nvidia.com/gpu"]
                    ), f"{name}: nvidia.com/gpu requests must equal limits"
    assert gpu_groups, f"{name}: no GPU worker group (nvidia.com/gpu limits)"


def _token_auth_on(doc: dict) -> bool:
    spec = _cluster_spec(doc)
    if spec.get("authOptions"):
        # KubeRay >= 1.5.1: the operator makes the Secret and sets RAY_AUTH_MODE / RAY_AUTH_TOKEN
        # in every Ray container (and the RayJob submitter).
        return spec["authOptions"].get("mode") == "token"
    # Older KubeRay: every Ray container sets both by hand, the token from a Secret.
    for where, template in _pod_templates(doc):
        if where == "submitter":
            continue
        for c in template["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                return False
            if "secretKeyRef" not in (env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}):
                return False
    return True


@pytest.mark.parametrize("item", RAY_DOCS, ids=_doc_id)
def test_kuberay_token_auth_and_no_exposure(item):
    name, doc = item
    spec = _cluster_spec(doc)
    assert _token_auth_on(doc), f"{name}: token authentication is off (set authOptions.mode: token)"
    for _, template in _pod_templates(doc):
        for c in _containers(template):
            modes = [e.get("value") for e in c.get("env", []) if e["name"] == "RAY_AUTH_MODE"]
            assert all(m == "token" for m in modes), f"{name} {c['name']}: RAY_AUTH_MODE={modes}"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") not in PUBLIC_SERVICE_TYPES, (
        f"{name}: head serviceType {head['serviceType']} exposes the dashboard / Jobs API"
    )
    svc_type = ((head.get("headService") or {}).get("spec") or {}).get("type", "ClusterIP")
    assert svc_type not in PUBLIC_SERVICE_TYPES, f"{name}: headService type {svc_type}"
    assert head.get("enableIngress") is not True, (
        f"{name}: enableIngress would expose the dashboard"
    )
    assert not head.get("ingressOptions"), f"{name}: ingressOptions"
    if doc["kind"] == "RayCluster":
        # Standalone cluster: dashboard only on the head Pod's loopback (kubectl port-forward).
        assert head.get("rayStartParams", {}).get("dashboard-host") == "127.0.0.1", (
            f"{name}: headGroupSpec.rayStartParams.dashboard-host must be 127.0.0.1"
        )


def _entrypoint_args(doc: dict) -> tuple[str, list[str]]:
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "emergence_ray", "train"], f"entrypoint {argv[:4]}"
    config, overrides = None, []
    it = iter(argv[4:])
    for arg in it:
        if arg == "--config":
            config = next(it)
        elif arg == "--set":
            overrides.append(next(it))
    assert config, "entrypoint has no --config"
    return config, overrides


@pytest.mark.parametrize("item", [i for i in RAY_DOCS if i[1]["kind"] == "RayJob"], ids=_doc_id)
def test_rayjob_entrypoint_is_a_valid_gpu_job_on_shared_storage(item):
    from emergence_ray.config import load_config

    name, doc = item
    assert doc["spec"].get("entrypoint", "").strip(), f"{name}: no entrypoint"
    assert doc["spec"].get("shutdownAfterJobFinishes") is True, (
        f"{name}: shutdownAfterJobFinishes: true"
    )
    config, overrides = _entrypoint_args(doc)
    assert config.startswith(APP_DIR + "/"), (
        f"{name}: --config {config} is not in the image ({APP_DIR})"
    )
    local = ROOT / config[len(APP_DIR) + 1 :]
    assert local.is_file(), (
        f"{name}: --config {config}: no {local.relative_to(ROOT)} in the repository"
    )
    cfg = load_config(local, overrides)  # the job's config and overrides validate
    assert re.match(r"^(s3|gs|gcs|abfss?|hdfs)://", cfg.run.storage_path), (
        f"{name}: run.storage_path {cfg.run.storage_path!r} is not shared by the Pods"
    )
    if cfg.scaling.use_gpu:
        gpus = sum(
            int(g.get("replicas", g.get("minReplicas", 0)))
            * sum(
                int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                for c in _containers(g["template"])
            )
            for g in _cluster_spec(doc)["workerGroupSpecs"]
        )
        assert gpus >= cfg.scaling.num_workers, (
            f"{name}: scaling.num_workers={cfg.scaling.num_workers} GPU workers, "
            f"the cluster starts with {gpus} GPUs"
        )


# --------------------------------------------------------------------- one image for everything


def test_one_image_everywhere():
    images = {_launcher(path)["docker"]["image"] for path in LAUNCHER_FILES}
    images |= {
        c["image"] for _, doc in RAY_DOCS for _, t in _pod_templates(doc) for c in _containers(t)
    }
    assert len(images) == 1, (
        f"head, workers and jobs should share one image, found {sorted(images)}"
    )


# ------------------------------------------------------------------------ Dockerfile, requirements


def _dockerfile_from_images() -> list[str]:
    """FROM images with ARG defaults (declared before the first FROM) substituted."""
    args: dict[str, str] = {}
    images, seen_from = [], False
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ARG" and not seen_from:
            key, _, default = rest.strip().partition("=")
            args[key.strip()] = default.strip().strip('"')
        elif word == "FROM":
            seen_from = True
            image = rest.split()[0] if not rest.startswith("--") else rest.split()[1]
            images.append(
                re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
            )
    return images


def test_dockerfile_base_pins_ray_and_python():
    images = _dockerfile_from_images()
    assert images, "docker/Dockerfile has no FROM"
    for image in images:
        assert "$" not in image, f"FROM {image}: an ARG without a default"
        repo, tag = image.rsplit(":", 1)
        assert repo == "rayproject/ray", f"FROM {image}: build on rayproject/ray"
        assert re.fullmatch(rf"{re.escape(RAY_VERSION)}-{PYTHON_TAG}-(cpu|cu\d{{3}}|gpu)", tag), (
            f"FROM {image}: expected rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-<cpu|cuXYZ>"
        )
    text = DOCKERFILE.read_text()
    assert re.search(rf"^WORKDIR {re.escape(APP_DIR)}\s*$", text, re.MULTILINE), (
        f"WORKDIR {APP_DIR}"
    )
    assert re.search(r"^COPY\b.*\bjobs/", text, re.MULTILINE), (
        "the image carries jobs/ (the RayJob's --config)"
    )
    assert re.search(r"pip install\b.*-r docker/requirements\.txt", text), (
        "pip install -r docker/requirements.txt"
    )
    assert re.search(r"pip install --no-deps \.", text), "pip install --no-deps ."


def _pinned() -> dict[str, Requirement]:
    reqs = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in reqs, f"requirements.txt lists {name} twice"
        reqs[name] = req
    return reqs


def test_requirements_are_exact_pins_inside_pyproject_ranges():
    pinned = _pinned()
    for req in pinned.values():
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"docker/requirements.txt: {req} is not an exact == pin"
        )
    for dep in DEPENDENCIES:
        name = canonicalize_name(dep.name)
        assert name in pinned, f"docker/requirements.txt lacks {dep.name} (pyproject: {dep})"
        version = next(iter(pinned[name].specifier)).version
        assert dep.specifier.contains(version, prereleases=True), (
            f"docker/requirements.txt pins {name}=={version}, outside pyproject's {dep}"
        )
        assert dep.extras <= pinned[name].extras, (
            f"{name}: pyproject needs extras {sorted(dep.extras)}"
        )
    ray_pin = next(iter(pinned["ray"].specifier)).version
    assert ray_pin == RAY_VERSION, (
        f"requirements.txt pins ray=={ray_pin}, the base image and this machine have {RAY_VERSION}"
    )


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", "runs/"):
        assert entry in ignored, f".dockerignore: {entry}"


@pytest.mark.parametrize("item", RAY_DOCS, ids=_doc_id)
def test_kuberay_ray_nodes_start_workers_at_normal_priority(item):
    """The image runs as a non-root user, so training workers cannot renice themselves from Ray's
    nice 15 (emergence_ray/priority.py): every Ray node starts its workers at 0 instead."""
    name, doc = item
    spec = _cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"]["template"])]
    groups += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    for where, template in groups:
        ray_container = _containers(template)[0]
        env = {e["name"]: e.get("value") for e in ray_container.get("env", [])}
        assert env.get("RAY_worker_niceness") == "0", f"{name} {where}: RAY_worker_niceness is not 0"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_nodes_start_workers_at_normal_priority(path):
    options = _launcher(path)["docker"]["run_options"]
    assert "--env RAY_worker_niceness=0" in options, f"{path.name}: docker run_options lack RAY_worker_niceness=0"


# ------------------------------------------------------------------- NetworkPolicy (issue 23)

TOKEN_PORTS = {8265, 6379, 10001}  # dashboard / Jobs API, GCS, Ray Client: Ray's token required
UNAUTHENTICATED_PORTS = {8080, 44217, 44227}  # Prometheus: agent export (KubeRay's), monitor, dashboard


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector {selector}: only matchLabels is checked here"
    wanted = selector.get("matchLabels") or {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_network_policy_keeps_ray_ports_inside_the_cluster(path):
    """Every KubeRay manifest ships a NetworkPolicy that selects all its Ray Pods and admits, on any
    port, only those Pods; anything wider is limited to token-protected ports (never the metrics
    ports, which answer without the token)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    ray_docs = [d for d in docs if d.get("apiVersion", "").startswith("ray.io/")]
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    assert policies, f"{path.name}: no NetworkPolicy"
    for policy in policies:
        assert policy["apiVersion"] == "networking.k8s.io/v1", policy["apiVersion"]
        spec = policy["spec"]
        assert "Ingress" in spec.get("policyTypes", []), f"{path.name}: policyTypes lacks Ingress"
        own = spec["podSelector"]
        for rule in spec.get("ingress", []):
            peers = rule.get("from")
            assert peers, f"{path.name}: an ingress rule without `from` admits every source"
            ports = {p.get("port") for p in rule.get("ports", [])}
            only_own_pods = all(set(peer) == {"podSelector"} and peer["podSelector"] == own for peer in peers)
            if not only_own_pods:
                assert ports, f"{path.name}: a rule admits other sources on every port: {rule}"
                assert ports <= TOKEN_PORTS and not ports & UNAUTHENTICATED_PORTS, (
                    f"{path.name}: other sources reach ports {sorted(ports)}; only {sorted(TOKEN_PORTS)} "
                    "(token-protected) may be opened wider than the cluster's own Pods")
                for peer in peers:
                    assert "cidr" not in (peer.get("ipBlock") or {}), f"{path.name}: ipBlock {peer}"
    for doc in ray_docs:
        for where, template in _pod_templates(doc):
            labels = template.get("metadata", {}).get("labels", {})
            assert any(_matches(p["spec"]["podSelector"], labels) for p in policies), (
                f"{path.name} {where}: labels {labels} are selected by no NetworkPolicy")
