"""Offline validation of lorkd's Kubernetes manifests (run by scripts/test-deploy.sh).

Renders every kustomization with `kubectl kustomize`, validates each object against the Kubernetes
OpenAPI schemas carried by the PyPI package kubernetes-validate (strict: unknown fields fail), at the
oldest Kubernetes version the manifest supports and at the newest the package knows, then checks what
a schema cannot: probes on the OIP v2 health routes, non-root + read-only root filesystem, a grace
period longer than the drain, selectors that match, and the LORKD_* keys of the ConfigMap (and of the
Dockerfiles and the KServe runtime) against the service's real variables, so they cannot drift.

    .venv/bin/python k8s/validate.py [--lorkd PATH_TO_BINARY]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"

# Kubernetes versions validated against. The oldest is set by the newest API each manifest uses:
# the preStop `sleep` action (PodLifecycleSleepAction, on by default since 1.30); image volumes (on by
# default since 1.35).
NEWEST = kubernetes_validate.utils.latest_version()
TARGETS: dict[str, str] = {
    "base": "1.30",
    "overlays/cpu": "1.30",
    "overlays/gpu": "1.30",
    "overlays/package-pvc": "1.30",
    "overlays/package-image": "1.35",
    "kserve": "1.30",
}
# Service variables deliberately not in the ConfigMap, with the reason.
NOT_IN_CONFIGMAP: dict[str, str] = {}
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$")
# Base ConfigMap values that deliberately differ from the service's defaults, with the reason. Every
# other key must equal the default, so a changed default in the service cannot leave a stale override.
BASE_OVERRIDES = {
    "LORKD_PACKAGE": "the image's baked-in package path",
    "LORKD_PROVIDER": "explicit cpu in the CPU deployment (default auto); the gpu overlay sets cuda",
    "LORKD_INTRA_OP_THREADS": "match the container's CPU limit (2) instead of the node's core count",
    "LORKD_PRELOAD": "warm every expert before the pod turns ready",
    "LORKD_LOG_FORMAT": "JSON logs for log collectors",
    "LORKD_API_KEYS_FILE": "API keys from the Secret lorkd-api-keys (authentication on in the cluster)",
    "LORKD_OPS_PORT": "metrics and info off the public Service, on the ops port",
}
OIP_LIVE, OIP_READY = "/v2/health/live", "/v2/health/ready"
CRD_GROUPS = ("serving.kserve.io/",)  # no schema in kubernetes-validate: checked structurally below

failures: list[str] = []


def fail(where: str, message: str) -> None:
    failures.append(f"{where}: {message}")


def service_variables(binary: str | None) -> tuple[dict[str, str], str]:
    """The service's LORKD_* variables with defaults: from `lorkd --print-env-vars`, else src/config.rs."""
    candidates = [binary] if binary else []
    src = ROOT / "src" / "config.rs"
    for profile in ("release", "debug"):
        path = ROOT / "target" / profile / "lorkd"
        # A binary older than config.rs may list stale variables: only trust a fresh one.
        if path.exists() and (not src.exists() or path.stat().st_mtime >= src.stat().st_mtime):
            candidates.append(str(path))
    for candidate in candidates:
        try:
            out = subprocess.run(
                [candidate, "--print-env-vars"],
                capture_output=True,
                text=True,
                timeout=30,
                env={"PATH": os.environ.get("PATH", "")},
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError) as err:
            print(f"validate: {candidate} --print-env-vars failed ({err}); trying the next source")
            continue
        variables = dict(line.split("=", 1) for line in out.splitlines() if re.match(r"^LORKD_[A-Z0-9_]+=", line))
        if variables:
            return variables, f"`{os.path.relpath(candidate, ROOT)} --print-env-vars`"
    if not src.exists():
        sys.exit("validate: no lorkd binary and no src/config.rs: cannot learn the service's variables")
    names = re.findall(r'env\s*=\s*"(LORKD_[A-Z0-9_]+)"', src.read_text())
    if not names:
        sys.exit('validate: src/config.rs names no LORKD_* variable (env = "LORKD_...")')
    return {name: "" for name in names}, "src/config.rs (no fresh binary; defaults unknown)"


def render(target: str) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / target)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        fail(target, f"kubectl kustomize failed: {out.stderr.strip()}")
        return []
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def schema_validate(target: str, doc: dict[str, Any], versions: list[str]) -> None:
    name = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = "/".join(str(p) for p in err.absolute_path)
            fail(name, f"k8s {version} schema: {err.message} at {path or '.'}")
        except kubernetes_validate.SchemaNotFoundError as err:
            fail(name, f"k8s {version}: {err.message}")


def pod_of(container: dict[str, Any], pod_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = dict(pod_spec or {})
    spec["containers"] = [container]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}


def check_env_names(where: str, names: list[str], variables: dict[str, str]) -> None:
    for name in names:
        if name.startswith("LORKD_") and name not in variables:
            fail(where, f"{name} is not a variable of the service (known: {', '.join(sorted(variables))})")


def check_configmap_values(where: str, data: dict[str, str], binary: str | None) -> None:
    """Parses the ConfigMap's values with the service itself (clap rejects a bad value at parse time)."""
    if not binary:
        return
    env = {"PATH": os.environ.get("PATH", ""), **{k: str(v) for k, v in data.items()}}
    out = subprocess.run([binary, "--print-env-vars"], check=False, capture_output=True, text=True, env=env, timeout=30)
    if out.returncode != 0:
        fail(where, f"the service rejects the ConfigMap's values: {out.stderr.strip()[:400]}")


def quantity_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for unit, factor in units.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    return int(float(value))


def check_memory_plan(where: str, data: dict[str, str], limit: str | None, binary: str | None) -> None:
    """The memory limit must hold the service's plan for these settings (lorkd --print-memory-plan)."""
    if not binary or limit is None or not QUANTITY.match(str(limit)):
        return
    env = {"PATH": os.environ.get("PATH", ""), **{k: str(v) for k, v in data.items()}}
    env["LORKD_PACKAGE"] = str(ROOT / "models/medmnist-lorkd")  # the package the image bakes in
    out = subprocess.run([binary, "--print-memory-plan"], check=False, capture_output=True, text=True, env=env,
                         timeout=60)
    if out.returncode != 0:
        fail(where, f"lorkd --print-memory-plan failed: {out.stderr.strip()[:300]}")
        return
    plan = json.loads(out.stdout)
    if plan["total"] > quantity_bytes(str(limit)):
        fail(where, f"memory limit {limit} is below the service's memory plan of {plan['total'] / 2**20:.0f} MiB "
                    f"({plan}): lower LORKD_CACHE_BYTES / LORKD_REQUEST_MEMORY_BYTES or raise the limit")


def check_workload(target: str, docs: list[dict[str, Any]], variables: dict[str, str], binary: str | None) -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for kind in ("Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        if len(by_kind.get(kind, [])) != 1:
            fail(target, f"expected exactly one {kind}, found {len(by_kind.get(kind, []))}")
            return
    deploy, service, configmap = by_kind["Deployment"][0], by_kind["Service"][0], by_kind["ConfigMap"][0]
    hpa, pdb = by_kind["HorizontalPodAutoscaler"][0], by_kind["PodDisruptionBudget"][0]
    pod = deploy["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"].get("labels", {})
    (container,) = [c for c in spec["containers"] if c["name"] == "lorkd"]

    def matches(selector: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    if not matches(deploy["spec"]["selector"]["matchLabels"]):
        fail(target, "Deployment selector does not match its pod labels")
    if not matches(service["spec"]["selector"]):
        fail(target, "Service selector does not match the pod labels")
    if not matches(pdb["spec"]["selector"]["matchLabels"]):
        fail(target, "PodDisruptionBudget selector does not match the pod labels")
    for policy in by_kind.get("NetworkPolicy", []):
        if not matches(policy["spec"]["podSelector"].get("matchLabels", {})):
            fail(target, "NetworkPolicy podSelector does not match the pod labels")
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if isinstance(port.get("port"), str) and port["port"] not in {
                    p.get("name") for p in container.get("ports", [])
                }:
                    fail(target, f"NetworkPolicy allows port {port['port']!r}, which the container does not declare")
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref["kind"], ref["name"]) != ("Deployment", deploy["metadata"]["name"]):
        fail(target, f"HorizontalPodAutoscaler targets {ref}, not the Deployment")
    if spec.get("enableServiceLinks") is not False:
        fail(target, "enableServiceLinks is not false: the Service `lorkd` would inject LORKD_PORT=tcp://...")
    if "replicas" in deploy["spec"]:
        fail(target, "Deployment sets replicas although the HPA owns the count")

    # Probes on the KServe OIP v2 health routes.
    probes = {
        p: container.get(p, {}).get("httpGet", {}).get("path")
        for p in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    if probes["livenessProbe"] != OIP_LIVE:
        fail(target, f"livenessProbe path is {probes['livenessProbe']}, expected {OIP_LIVE}")
    if probes["readinessProbe"] != OIP_READY:
        fail(target, f"readinessProbe path is {probes['readinessProbe']}, expected {OIP_READY}")
    port_names = {p.get("name") for p in container.get("ports", [])}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        port = container.get(probe, {}).get("httpGet", {}).get("port")
        if port is not None and isinstance(port, str) and port not in port_names:
            fail(target, f"{probe} uses port name {port!r}, which the container does not declare")

    # Resources: requests and limits for cpu and memory.
    resources = container.get("resources", {})
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in resources.get(part, {}):
                fail(target, f"container has no {part}.{res}")
        for res, value in resources.get(part, {}).items():
            if not QUANTITY.match(str(value)):  # the schema only says "string or number"
                fail(target, f"{part}.{res}={value!r} is not a Kubernetes quantity")

    # Non-root, read-only root filesystem, nothing extra.
    psc, csc = spec.get("securityContext", {}), container.get("securityContext", {})
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        fail(target, "runAsNonRoot is not set")
    if (csc.get("runAsUser", psc.get("runAsUser")) or 0) == 0:
        fail(target, "runAsUser is root or unset")
    if csc.get("readOnlyRootFilesystem") is not True:
        fail(target, "readOnlyRootFilesystem is not true")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail(target, "allowPrivilegeEscalation is not false")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        fail(target, "capabilities are not all dropped")
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    if "/tmp" not in mounts:
        fail(target, "no writable /tmp volume although the root filesystem is read-only")
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if mount["name"] not in volumes:
            fail(target, f"volumeMount {mount['name']} has no volume")

    # The ConfigMap: LORKD_* keys only, the same set as the service's variables, values it accepts.
    env_from = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
    if env_from != [configmap["metadata"]["name"]]:
        fail(target, f"container envFrom {env_from} does not reference the ConfigMap {configmap['metadata']['name']}")
    data = configmap.get("data", {})
    non_lorkd = [k for k in data if not k.startswith("LORKD_")]
    if non_lorkd:
        fail(target, f"ConfigMap keys that are not LORKD_* variables: {non_lorkd}")
    check_env_names(f"{target}: ConfigMap", list(data), variables)
    check_env_names(f"{target}: container env", [e["name"] for e in container.get("env", [])], variables)
    missing = sorted(set(variables) - set(data) - set(NOT_IN_CONFIGMAP))
    if missing:
        fail(
            target,
            f"service variables missing from the ConfigMap (add them with their defaults to "
            f"k8s/base/lorkd.env, or list them in NOT_IN_CONFIGMAP with a reason): {missing}",
        )
    check_configmap_values(f"{target}: ConfigMap", data, binary)
    check_memory_plan(f"{target}: memory", data, resources.get("limits", {}).get("memory"), binary)
    if target == "base" and binary:  # defaults are known only from the binary's listing
        for key, value in sorted(data.items()):
            if key in variables and key not in BASE_OVERRIDES and str(value) != variables[key]:
                fail(
                    target,
                    f"{key}={value} differs from the service default {variables[key]!r}: use the default, "
                    "or list it in BASE_OVERRIDES with a reason",
                )

    # Drain: grace period > preStop sleep + the service's shutdown timeout.
    drain_s = int(data.get("LORKD_SHUTDOWN_TIMEOUT_MS", variables.get("LORKD_SHUTDOWN_TIMEOUT_MS") or 0)) / 1000
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not grace > pre_stop + drain_s:
        fail(target, f"terminationGracePeriodSeconds {grace} is not above preStop {pre_stop}s + drain {drain_s}s")

    # Package: LORKD_PACKAGE must be a mounted path or the image's baked-in one.
    package = data.get("LORKD_PACKAGE", "")
    if package != "/opt/lorkd/package" and not any(
        package == m or package.startswith(m.rstrip("/") + "/") for m in mounts
    ):
        fail(target, f"LORKD_PACKAGE={package} is neither the image's package nor under a mounted volume")

    # Authentication on: API keys from a mounted Secret (never a literal key in a ConfigMap).
    key_file = data.get("LORKD_API_KEYS_FILE", "")
    for literal in ("LORKD_API_KEYS", "LORKD_ADMIN_KEYS"):
        if data.get(literal):
            fail(target, f"{literal} holds literal keys in the ConfigMap; mount a Secret and use {literal}_FILE")
    if not key_file:
        fail(target, "authentication is off: LORKD_API_KEYS_FILE is empty")
    else:
        secret_mounts = {
            m["mountPath"]
            for m in container.get("volumeMounts", [])
            for v in spec.get("volumes", [])
            if v["name"] == m["name"] and "secret" in v
        }
        if not any(key_file.startswith(m.rstrip("/") + "/") for m in secret_mounts):
            fail(target, f"LORKD_API_KEYS_FILE={key_file} is not inside a mounted Secret volume")

    # Overlay-specific promises.
    provider = data.get("LORKD_PROVIDER")
    if target == "overlays/gpu":
        limits = resources.get("limits", {})
        if str(limits.get("nvidia.com/gpu")) != "1":
            fail(target, "GPU overlay does not limit nvidia.com/gpu to 1")
        if provider != "cuda":
            fail(target, f"GPU overlay has LORKD_PROVIDER={provider}, expected cuda")
        if not container["image"].endswith("-cuda"):
            fail(target, f"GPU overlay runs {container['image']}, not the CUDA image")
    elif target != "base":
        if provider != "cpu":
            fail(target, f"LORKD_PROVIDER={provider}, expected cpu")
        if "nvidia.com/gpu" in resources.get("limits", {}):
            fail(target, "a CPU deployment requests a GPU")


def check_kserve(target: str, docs: list[dict[str, Any]], versions: list[str], variables: dict[str, str]) -> None:
    runtimes = [d for d in docs if d["kind"] == "ServingRuntime"]
    services = [d for d in docs if d["kind"] == "InferenceService"]
    if len(runtimes) != 1 or len(services) != 1:
        fail(target, "expected one ServingRuntime and one InferenceService")
        return
    runtime, isvc = runtimes[0], services[0]
    if runtime["apiVersion"] != "serving.kserve.io/v1alpha1" or isvc["apiVersion"] != "serving.kserve.io/v1beta1":
        fail(target, "unexpected KServe apiVersions")
    rspec = runtime["spec"]
    if "v2" not in rspec.get("protocolVersions", []):
        fail(target, "ServingRuntime does not declare protocol v2")
    model = isvc["spec"]["predictor"]["model"]
    if model.get("runtime") != runtime["metadata"]["name"]:
        fail(target, "InferenceService does not use the lorkd ServingRuntime")
    formats = {f["name"] for f in rspec.get("supportedModelFormats", [])}
    if model.get("modelFormat", {}).get("name") not in formats:
        fail(target, "InferenceService's modelFormat is not one the runtime supports")
    if not model.get("storageUri"):
        fail(target, "InferenceService has no storageUri")
    # The runtime's containers are core/v1 Containers: validate them inside a Pod with the real schema.
    for container in rspec.get("containers", []):
        schema_validate(f"{target}: ServingRuntime container", pod_of(container), versions)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        check_env_names(f"{target}: ServingRuntime env", list(env), variables)
        if env.get("LORKD_PACKAGE") != "/mnt/models":
            fail(target, "ServingRuntime must serve KServe's model folder (LORKD_PACKAGE=/mnt/models)")
        paths = {container.get(p, {}).get("httpGet", {}).get("path") for p in ("livenessProbe", "readinessProbe")}
        if paths != {OIP_LIVE, OIP_READY}:
            fail(target, f"ServingRuntime probes {paths} are not the OIP v2 health routes")


def check_loose_manifests() -> None:
    """Manifests applied with `kubectl apply -f` rather than through a kustomization."""
    for path in sorted(K8S.glob("overlays/*/loader-pod.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                schema_validate(str(path.relative_to(K8S)), doc, ["1.30", NEWEST])
        print(f"validate: {path.relative_to(K8S)} against k8s 1.30 and {NEWEST}")


def check_dockerfiles(variables: dict[str, str]) -> None:
    for dockerfile in sorted((ROOT / "docker").glob("Dockerfile*")):
        names = re.findall(r"\b(LORKD_[A-Z0-9_]+)=", dockerfile.read_text())
        build_args = set(re.findall(r"^ARG\s+(LORKD_[A-Z0-9_]+)", dockerfile.read_text(), re.MULTILINE))
        check_env_names(f"docker/{dockerfile.name}", [n for n in names if n not in build_args], variables)


def self_test(variables: dict[str, str], binary: str | None) -> None:
    """The checks must catch known-bad manifests: mutate the rendered cpu overlay and expect failures."""
    docs = render("overlays/cpu")

    def find(kind: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
        return next(d for d in docs if d["kind"] == kind)

    def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
        return find("Deployment", docs)["spec"]["template"]["spec"]["containers"][0]

    mutations = {
        "unknown ConfigMap key": lambda d: find("ConfigMap", d)["data"].update(LORKD_NO_SUCH_SETTING="1"),
        "service variable missing": lambda d: find("ConfigMap", d)["data"].pop("LORKD_PORT"),
        "readiness not on OIP route": lambda d: container(d)["readinessProbe"]["httpGet"].update(path="/healthz"),
        "writable root filesystem": lambda d: container(d)["securityContext"].update(readOnlyRootFilesystem=False),
        "grace period below drain": lambda d: find("Deployment", d)["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=20
        ),
        "schema: unknown field": lambda d: container(d).update(imagePullPolicyy="Always"),
        "schema: wrong type": lambda d: container(d)["ports"][0].update(containerPort="eighty"),
        "service links on": lambda d: find("Deployment", d)["spec"]["template"]["spec"].pop("enableServiceLinks"),
        "bad quantity": lambda d: container(d)["resources"]["limits"].update(memory="lots"),
        "authentication off": lambda d: find("ConfigMap", d)["data"].update(LORKD_API_KEYS_FILE=""),
        "key file outside the Secret": lambda d: find("ConfigMap", d)["data"].update(LORKD_API_KEYS_FILE="/tmp/keys"),
        "memory limit below the plan": lambda d: container(d)["resources"]["limits"].update(memory="300Mi"),
        "service selector mismatch": lambda d: find("Service", d)["spec"]["selector"].update(
            {"app.kubernetes.io/component": "other"}
        ),
    }
    if not binary:
        mutations.pop("memory limit below the plan")
    for name, mutate in mutations.items():
        broken = copy.deepcopy(docs)
        mutate(broken)
        before = len(failures)
        for doc in broken:
            schema_validate("self-test", doc, [NEWEST])
        check_workload("self-test", broken, variables, binary)
        caught = len(failures) > before
        del failures[before:]
        if not caught:
            fail("self-test", f"a manifest with '{name}' passed the checks")
    print(f"validate: self-test: all {len(mutations)} known-bad variants of overlays/cpu are caught")
    if not binary:
        print("validate: self-test: skipped the memory-plan variant (needs a lorkd binary)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lorkd", help="the lorkd binary to ask for its variables (default: a fresh target/*/lorkd)")
    args = parser.parse_args()
    if not shutil.which("kubectl"):
        print("validate: kubectl not found; it renders the kustomizations (kubectl kustomize)")
        return 1
    variables, source = service_variables(args.lorkd)
    binary = None
    if source.startswith("`"):
        binary = str(ROOT / source.strip("`").split()[0])
    print(f"validate: {len(variables)} service variables from {source}")
    print(f"validate: kubernetes-validate {kubernetes_validate.__version__}, schemas up to Kubernetes {NEWEST}")
    self_test(variables, binary)
    check_dockerfiles(variables)
    check_loose_manifests()
    for target, oldest in TARGETS.items():
        versions = [oldest] if oldest == NEWEST else [oldest, NEWEST]
        docs = render(target)
        if not docs:
            continue
        for doc in docs:
            if doc["apiVersion"].startswith(CRD_GROUPS):
                continue
            schema_validate(target, doc, versions)
        if target == "kserve":
            check_kserve(target, docs, versions, variables)
        else:
            check_workload(target, docs, variables, binary)
        kinds = ", ".join(sorted(f"{d['kind']}" for d in docs))
        print(f"validate: {target}: {len(docs)} objects ({kinds}) against k8s {' and '.join(versions)}")
    if failures:
        print(f"validate: FAILED ({len(failures)})")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print("validate: all manifests OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
