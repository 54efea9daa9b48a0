"""deploy/ checked offline: what production runs is validated here, without a cluster, a GPU or a Docker engine.

- Kubernetes: `kubectl kustomize` renders base and both overlays; every rendered object passes the Kubernetes
  1.32 schemas bundled by kubernetes-validate (strict); the KEDA ScaledObjects (a CRD it has no schema for)
  pass deploy/k8s/schemas/keda-scaledobject-v1alpha1.json, written from KEDA's documentation, and their HPA
  behaviour Kubernetes' own autoscaling/v2 schema.
- No drift from the code: the vLLM args (manifests, compose, the model image's CMD) are what
  ``opal/vllm_server.py: vllm_argv`` renders for the settings the ConfigMap gives; every worker command is an
  `opal` command whose options parse; KEDA triggers name the groups and topics ``topology/declared.py`` declares,
  on the broker the workers use; ConfigMap, compose and image ``OPAL_*`` names are settings, none secret.
- Prometheus: `promtool check rules`, `promtool test rules`, `promtool check config`; every metric (and label)
  that an alert or a dashboard query names is one the workers export (``workers/metrics.py``; the preference
  builder exports none).
- Compose: `docker-compose config` (Debian's 1.29.2) accepts the file.

The tools come from `make install-deploy-tools` (``deploy/scripts/install_tools.sh``, into ``.tools/``); a
missing tool fails these tests, it never skips them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import pytest
import yaml

from inference.images import PixelBudget
from tests.support import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
TOOLS = REPO / ".tools" / "bin"
K8S_VERSION = "1.32"
RENDERINGS = ("base", "overlays/dev", "overlays/prod")
SHIPPED_MODEL = REPO / "models" / "opal-tiny-abo"
MODEL_IN_IMAGE = "/opt/opal/models/opal-tiny-abo"
VLLM_PORT = 8000
METRICS_PORT = 9100
TARGET_LABELS = {"job", "instance", "namespace", "pod"}  # added by the scrape, on every series
PROMETHEUS_BUILTINS = {"up": set()}
A100 = "NVIDIA-A100-SXM4-80GB"


# -- tools and renderings ---------------------------------------------------------------------------------------
def tool(name: str) -> str:
    path = TOOLS / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `make install-deploy-tools` (deploy/scripts/install_tools.sh)")
    return str(path)


def run(*argv: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)
    assert p.returncode == 0, f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


@cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize deploy/k8s/<name>` renders."""
    return tuple(d for d in yaml.safe_load_all(run(tool("kubectl"), "kustomize", str(K8S / name))) if d)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def config_env(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    (cm,) = of_kind(docs, "ConfigMap")
    assert cm["metadata"]["name"].startswith("opal-settings")
    return dict(cm["data"])


def pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in of_kind(docs, "Deployment"):
        yield d["metadata"]["name"], d["spec"]["template"]["spec"]


@cache
def compose() -> dict[str, Any]:
    """`docker-compose config` of the compose file (variables at their defaults): the file as Docker sees it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPAL_", "GRAFANA_", "COMPOSE_", "DOCKER_"))}
    out = run(tool("docker-compose"), "-f", str(DEPLOY / "compose" / "docker-compose.yml"), "config", env=env)
    return yaml.safe_load(out)


# -- settings ---------------------------------------------------------------------------------------------------
def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """OpalSettings as a container with exactly this environment reads them (no .env file)."""
    from schemas.settings import OpalSettings

    for k in [k for k in os.environ if k.startswith("OPAL_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return OpalSettings(_env_file=None)


@cache
def setting_names() -> tuple[set[str], set[str]]:
    """(every setting's variable, the secret ones: the SecretStr fields `opal settings` always masks)."""
    from pydantic import SecretStr

    from schemas.settings import OpalSettings

    def holds_secret(annotation: Any) -> bool:  # SecretStr or SecretStr | None (a dict of them is checked by value)
        return annotation is SecretStr or (get_origin(annotation) in (Union, UnionType) and SecretStr in get_args(annotation))

    names, secret = set(), set()
    for group, gfield in OpalSettings.model_fields.items():
        for name, f in gfield.annotation.model_fields.items():  # type: ignore[union-attr]
            var = f"OPAL_{group.upper()}_{name.upper()}"
            names.add(var)
            if holds_secret(f.annotation):
                secret.add(var)
    assert names == {row[0] for row in OpalSettings().describe()}
    return names, secret


def masked(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names in ``env`` whose value `opal settings` would mask (a secret librdkafka key in
    OPAL_KAFKA_OVERRIDES, by schemas/settings.py is_secret_key; any SecretStr) or that hold user:password@."""
    from schemas.settings import MASK

    shown = dict((name, value) for name, value, _ in settings_from(env, monkeypatch).describe())
    userinfo = re.compile(r"://[^/\s\"'@]*@")  # a schema-registry URL's moves to another setting before describe()
    return sorted(k for k in env if MASK in shown[k] or userinfo.search(env[k]))


# -- vLLM -------------------------------------------------------------------------------------------------------
def expected_vllm_args(vllm_settings: Any) -> list[str]:
    """vllm_argv for the shipped model as the model image holds it, on all interfaces."""
    from opal.vllm_server import vllm_argv

    argv = vllm_argv(vllm_settings, SHIPPED_MODEL, VLLM_PORT, host="0.0.0.0")
    i = argv.index("--model")
    return [*argv[: i + 1], MODEL_IN_IMAGE, *argv[i + 2 :]]


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "docker" / name).read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instr, _, rest = line.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", RENDERINGS)
def test_vllm_args_are_what_opal_serve_renders(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vLLM container runs exactly vllm_argv's flags (structured outputs, limits, logprobs, GPU set) for the
    settings its ConfigMap gives, on the model baked into the image; the same in compose and the image's CMD."""
    from opal.vllm_server import served_name, vllm_env

    docs = rendered(name)
    s = settings_from(config_env(docs), monkeypatch)
    assert s.vllm.device == "cuda"
    # workers cannot read the served model's folder here: its image budget is a setting, equal to the model's own
    shipped_budget = PixelBudget.from_preprocessor(json.loads((SHIPPED_MODEL / "preprocessor_config.json").read_text()))
    assert shipped_budget is not None and s.vllm.max_pixels == shipped_budget.max_pixels
    want = expected_vllm_args(s.vllm)
    assert "--structured-outputs-config" in want and "--gpu-memory-utilization" in want
    assert want[want.index("--served-model-name") + 1] == served_name(SHIPPED_MODEL)

    spec = named(docs, "Deployment", "opal-vllm")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert "command" not in c, "the image's ENTRYPOINT (vLLM's OpenAI server) runs the args"
    assert c["args"] == want
    assert [p["containerPort"] for p in c["ports"]] == [VLLM_PORT]
    env = {e["name"]: e.get("value") for e in c["env"]}
    for k, v in vllm_env(s.vllm, Path("/unused")).items():  # the GPU server's environment, less its local paths
        if k not in ("TMPDIR", "VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH"):
            assert env.get(k) == v, k
    # compiled kernels on a volume that outlives the container, a shared claim in prod (the cache opal serve keeps)
    cache_vars = set(vllm_env(s.vllm, Path("/unused"), SHIPPED_MODEL)) - set(vllm_env(s.vllm, Path("/unused"))) | {"VLLM_CACHE_ROOT"}
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "compile-cache")
    assert cache_vars == {"VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}
    assert all((env[k] or "").startswith(mount + "/") for k in cache_vars), env
    volume = next(v for v in spec["volumes"] if v["name"] == "compile-cache")
    assert sorted(volume) == sorted(["name", "persistentVolumeClaim" if name.endswith("prod") else "emptyDir"]), volume
    if "persistentVolumeClaim" in volume:  # rendered with the overlay, shared by the replicas
        claim = named(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    api_key = next(e for e in c["env"] if e["name"] == "VLLM_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"] == {"name": "opal-secrets", "key": "OPAL_VLLM_API_KEY"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe

    if name == "base":
        services = compose()["services"]
        compose_settings = settings_from(services["enrich-worker"]["environment"], monkeypatch)
        assert compose_settings.vllm.max_pixels == shipped_budget.max_pixels
        assert services["vllm"]["command"] == expected_vllm_args(compose_settings.vllm)
        instructions = dockerfile("model.Dockerfile")
        cmd = [json.loads(a) for i, a in instructions if i == "CMD"][-1]
        assert cmd == expected_vllm_args(type(s.vllm)(device="cuda"))
        assert [json.loads(a) for i, a in instructions if i == "ENTRYPOINT"][-1] == [
            "python",
            "-m",
            "vllm.entrypoints.openai.api_server",
        ]
        assert ("COPY", f"models/opal-tiny-abo {MODEL_IN_IMAGE}") in instructions


# -- Kubernetes schemas -----------------------------------------------------------------------------------------
@cache
def keda_validator() -> Any:
    import jsonschema

    schema = json.loads((K8S / "schemas" / "keda-scaledobject-v1alpha1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_scaled_object(doc: dict[str, Any]) -> None:
    """The KEDA schema, then the HPA behaviour KEDA hands to Kubernetes through Kubernetes' own schema."""
    import kubernetes_validate

    keda_validator().validate(doc)
    spec = doc["spec"]
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": doc["metadata"]["name"]},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec["scaleTargetRef"]["name"]},
                "minReplicas": max(1, spec.get("minReplicaCount", 0)),
                "maxReplicas": spec.get("maxReplicaCount", 100),
                "behavior": behavior,
            },
        }
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_object_passes_its_schema(name: str) -> None:
    import kubernetes_validate

    docs = rendered(name)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "ScaledObject", "NetworkPolicy"} <= kinds
    for doc in docs:
        where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            if doc["apiVersion"] == "keda.sh/v1alpha1":
                validate_scaled_object(doc)
            else:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except Exception as e:  # the path in the object makes the failure readable
            raise AssertionError(f"{where}: {'.'.join(str(p) for p in getattr(e, 'path', ()))}: {e}") from None


def test_the_backfill_job_passes_its_schema_and_runs_opal_backfill() -> None:
    """deploy/k8s/jobs/backfill.yaml (applied by hand, outside the kustomizations): valid objects, a real `opal backfill`
    invocation with its checkpoint on the volume, the stream-worker label (Kafka egress) and restricted pods."""
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all((K8S / "jobs" / "backfill.yaml").read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (job,) = [d for d in docs if d["kind"] == "Job"]
    pod = job["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["args"][0] == "backfill" and "--state-dir" in c["args"]
    state = c["args"][c["args"].index("--state-dir") + 1]
    assert any(m["mountPath"] == state for m in c["volumeMounts"])
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "stream-worker"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    command, ctx = opal_command(c["args"])
    assert command == "backfill" and ctx.params["state_dir"] == Path(state) and ctx.params["inventory"].startswith("s3://")


def test_the_keda_schema_has_teeth() -> None:
    """A ScaledObject with a number where KEDA wants a string, an undocumented kafka parameter, or a trigger
    without metadata is refused (so the schema is not a pass-everything stub)."""
    import jsonschema

    good = named(rendered("base"), "ScaledObject", "opal-enrich-worker")
    validate_scaled_object(good)
    bad_docs = []
    for mutate in (
        lambda d: d["spec"]["triggers"][0]["metadata"].update(lagThreshold=50),
        lambda d: d["spec"]["triggers"][0]["metadata"].update(lagTreshold="50"),
        lambda d: d["spec"]["triggers"][0].pop("metadata"),
        lambda d: d["spec"].update(maxReplicas=3),
    ):
        d = json.loads(json.dumps(good))
        mutate(d)
        bad_docs.append(d)
    for d in bad_docs:
        with pytest.raises(jsonschema.ValidationError):
            keda_validator().validate(d)


# -- the workers ------------------------------------------------------------------------------------------------
def opal_command(args: list[str]) -> tuple[str, Any]:
    """Parse ``args`` with the real `opal` CLI (no command runs): (command path, click context)."""
    import typer

    from opal.cli import app

    cmd: Any = typer.main.get_command(app)
    path: list[str] = []
    rest = list(args)
    while hasattr(cmd, "list_commands"):  # a group (typer ships its own click: no isinstance against click's)
        assert rest, f"{args}: no command under `opal {' '.join(path)}`"
        sub = cmd.get_command(cmd.context_class(cmd), rest[0])
        assert sub is not None, f"`opal {' '.join([*path, rest[0]])}` is not a command"
        path.append(rest.pop(0))
        cmd = sub
    return " ".join(path), cmd.make_context(" ".join(path), rest)


STREAM_COMMANDS = {
    "opal-enrich-worker": "worker enrich",
    "opal-indexer": "worker index",
    "opal-judge": "worker judge",
    "opal-preference-builder": "worker preferences",
}


@pytest.mark.parametrize("name", RENDERINGS)
def test_workers_run_opal_commands_and_serve_metrics_where_probed(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each stream Deployment runs its `opal worker ...` command (options parsed by the CLI itself) after
    `opal topology apply`; probes and the scrape annotation point at the port the command serves /metrics on."""
    docs = rendered(name)
    s = settings_from(config_env(docs), monkeypatch)
    seen = {}
    for dep, spec in pod_specs(docs):
        if dep == "opal-vllm":
            continue
        (c,) = spec["containers"]
        command, ctx = opal_command(c["args"])
        seen[dep] = command
        assert [opal_command(i["args"])[0] for i in spec["initContainers"]] == ["topology apply"]
        if command == "worker enrich":
            port = ctx.params["metrics_port"] if ctx.params["metrics_port"] is not None else s.worker.metrics_port
        else:
            port = ctx.params.get("metrics_port")
        template = named(docs, "Deployment", dep)["spec"]["template"]
        if port is None:  # the preference builder serves no metrics, so nothing may probe or scrape it
            assert "ports" not in c and "livenessProbe" not in c and "annotations" not in template["metadata"]
            continue
        assert port == METRICS_PORT
        assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, (dep, probe)
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert seen == STREAM_COMMANDS


def test_compose_services_run_opal_commands() -> None:
    services = compose()["services"]
    stream = {n: s for n, s in services.items() if s.get("image", "").startswith("opal-stream")}
    commands = {n: opal_command(s["command"])[0] for n, s in stream.items()}
    assert commands == {
        "topology": "topology apply",
        "enrich-worker": "worker enrich",
        "indexer": "worker index",
        "judge": "worker judge",
        "preference-builder": "worker preferences",
    }
    for n in commands.keys() - {"topology"}:
        assert services[n]["depends_on"]["topology"] == {"condition": "service_completed_successfully"}, n
    assert services["topology"]["depends_on"]["kafka"] == {"condition": "service_healthy"}


def test_worker_metrics_bind_where_the_setting_says(tmp_path: Path) -> None:
    """The stream image sets OPAL_WORKER_METRICS_HOST=0.0.0.0, so a probe or a Prometheus elsewhere reaches every
    worker's /metrics; the code's default stays 127.0.0.1 (a laptop)."""
    script = tmp_path / "bound.py"
    script.write_text(
        "from opal.commands.worker import _metrics_url\n"
        "from schemas.settings import OpalSettings\n"
        "from workers.metrics import IndexerMetrics, JudgeMetrics, WorkerMetrics\n"
        "s = OpalSettings()\n"
        "for cls in (WorkerMetrics, IndexerMetrics, JudgeMetrics):\n"
        "    port = cls().serve(0, s.worker.metrics_host)\n"
        "    rows = [line.split() for line in open('/proc/net/tcp').read().splitlines()[1:]]\n"
        "    (addr,) = [r[1].split(':')[0] for r in rows if int(r[1].split(':')[1], 16) == port and r[3] == '0A']\n"
        "    assert _metrics_url(s, port) == f'http://127.0.0.1:{port}/metrics'\n"
        "    print(addr)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPAL_")}
    image_env = dict(re.findall(r"(OPAL_WORKER_METRICS_HOST)=(\S+)", (DEPLOY / "docker" / "stream.Dockerfile").read_text()))
    assert image_env == {"OPAL_WORKER_METRICS_HOST": "0.0.0.0"}, image_env
    in_image = subprocess.run([sys.executable, str(script)], env=env | image_env, capture_output=True, text=True, check=True)
    default = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True)
    assert in_image.stdout.split() == ["00000000"] * 3, in_image.stdout  # 0.0.0.0
    assert default.stdout.split() == ["0100007F"] * 3, default.stdout  # 127.0.0.1


# -- KEDA against the topology ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RENDERINGS)
def test_keda_triggers_follow_the_declared_topology(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kafka trigger reads the lag of a consumer group topology/declared.py declares, on a topic that group
    reads, on the broker the workers use; each lane of the enrich worker has its trigger; replicas stay within
    the topic's partitions (more consumers would sit idle)."""
    from schemas.events import Lane
    from topology.declared import INDEXER_GROUP, JUDGE_GROUP, build_topology, enrich_group_id

    docs = rendered(name)
    s = settings_from(config_env(docs), monkeypatch)
    topo = build_topology(s)
    reads = {(g.group_id, t) for g in topo.groups for t in g.reads}
    owner = {enrich_group_id(s.worker.group_id, lane): "opal-enrich-worker" for lane in Lane}
    owner |= {INDEXER_GROUP: "opal-indexer", JUDGE_GROUP: "opal-judge"}
    covered = set()
    for so in of_kind(docs, "ScaledObject"):
        spec = so["spec"]
        target = spec["scaleTargetRef"]["name"]
        named(docs, "Deployment", target)
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec.get("fallback", {}).get("replicas", 0) <= spec["maxReplicaCount"]
        for trig in spec["triggers"]:
            m = trig["metadata"]
            assert trig["type"] == "kafka"
            assert m["bootstrapServers"] == s.kafka.bootstrap
            assert (m["consumerGroup"], m["topic"]) in reads, m
            assert owner[m["consumerGroup"]] == target, m
            assert spec["maxReplicaCount"] <= topo.topic(m["topic"]).partitions, (so["metadata"]["name"], m["topic"])
            covered.add(m["consumerGroup"])
    assert covered == set(owner)


# -- settings in ConfigMaps, Secrets, compose and images --------------------------------------------------------
def env_file(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {k.strip(): v for k, v in pairs}


def test_config_names_are_settings_and_none_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every OPAL_ name in a ConfigMap (source env files and rendered), the compose environment and the image
    ENV is a setting `opal settings` knows and parses; no secret setting (nor a value it would mask) is in a ConfigMap."""
    from schemas.settings import mask_url

    names, secret = setting_names()
    sources = {str(p.relative_to(REPO)): env_file(p) for p in sorted(K8S.rglob("settings.env"))}
    assert len(sources) == 3
    sources |= {f"rendered {n}": config_env(rendered(n)) for n in RENDERINGS}
    for where, env in sources.items():
        assert set(env) <= names, f"{where}: not settings: {sorted(set(env) - names)}"
        assert not set(env) & secret, f"{where}: secret settings in a ConfigMap: {sorted(set(env) & secret)}"
        assert not masked(env, monkeypatch), f"{where}: values `opal settings` masks: {masked(env, monkeypatch)}"
    for service, spec in compose()["services"].items():
        env = {k: v for k, v in (spec.get("environment") or {}).items() if k.startswith("OPAL_")}
        assert set(env) <= names, f"compose {service}: not settings: {sorted(set(env) - names)}"
        # secrets come from the shell's variables (empty when unset), never written in the file; a secret URL
        # setting may be written without credentials (compose's Redis has no password)
        written = {k: v for k, v in env.items() if v}
        for k in set(written) & secret:
            assert "://" in written[k] and mask_url(written[k]) == written[k], f"compose {service}: {k} holds a credential"
        plain = {k: v for k, v in written.items() if k not in secret}
        assert not masked(plain, monkeypatch), f"compose {service}: credentials in the file: {masked(plain, monkeypatch)}"
    for image in ("stream.Dockerfile", "model.Dockerfile"):
        env_names = {m for i, a in dockerfile(image) if i == "ENV" for m in re.findall(r"\b(OPAL_\w+)=", a)}
        assert env_names <= names - secret, f"{image}: {sorted(env_names - (names - secret))}"


def test_secret_holds_only_secret_settings_and_placeholders() -> None:
    """The base Secret has secret settings only, with CHANGE-ME placeholders; prod renders no Secret (it is
    created from a secret store, never overwritten by an apply); every OPAL container reads both objects."""
    _, secret = setting_names()
    for n in RENDERINGS:
        docs = rendered(n)
        secrets = of_kind(docs, "Secret")
        if n == "overlays/prod":
            assert secrets == []
        else:
            (sec,) = secrets
            assert sec["metadata"]["name"] == "opal-secrets"
            data = sec["stringData"]
            assert set(data) <= secret, sorted(set(data) - secret)
            assert {"OPAL_REDIS_URL", "OPAL_VLLM_API_KEY"} <= set(data)
            assert all("CHANGE-ME" in v for v in data.values()), "placeholders only in git"
        for dep, spec in pod_specs(docs):
            if dep == "opal-vllm":
                continue
            for c in spec["containers"] + spec.get("initContainers", []):
                refs = [next(iter(e.values()))["name"] for e in c["envFrom"]]
                assert refs[0].startswith("opal-settings-") and refs[1] == "opal-secrets", (dep, refs)


# -- placement, security, policies ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RENDERINGS)
def test_vllm_runs_on_gpu_nodes_behind_a_service_and_a_budget(name: str) -> None:
    docs = rendered(name)
    dep = named(docs, "Deployment", "opal-vllm")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    if name == "overlays/dev":
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    else:
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": A100}
    replicas = {"base": 1, "overlays/dev": 1, "overlays/prod": 3}[name]
    assert dep["spec"]["replicas"] == replicas
    labels = dep["spec"]["template"]["metadata"]["labels"]
    pdb = named(docs, "PodDisruptionBudget", "opal-vllm")["spec"]
    svc = named(docs, "Service", "opal-vllm")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["maxUnavailable"] == 1
    assert svc["selector"].items() <= labels.items() and svc["ports"][0]["port"] == VLLM_PORT


@pytest.mark.parametrize("name", RENDERINGS)
def test_pods_meet_the_restricted_pod_security_standard(name: str) -> None:
    docs = rendered(name)
    for ns in of_kind(docs, "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for dep, spec in pod_specs(docs):
        assert spec["automountServiceAccountToken"] is False, dep
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["seccompProfile"] == {"type": "RuntimeDefault"}, dep
        for c in spec["containers"] + spec.get("initContainers", []):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}, (dep, c["name"])
            assert csc["readOnlyRootFilesystem"] is True, (dep, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"], (dep, c["name"])
            image, _, tag = c["image"].rpartition(":")
            assert image.split("/")[-1] in ("opal-stream", "opal-model") and re.fullmatch(r"\d+\.\d+\.\d+", tag), c["image"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


@pytest.mark.parametrize("name", RENDERINGS)
def test_network_policies_let_pods_reach_only_their_dependencies(name: str) -> None:
    """Default deny; then the stream workers reach Kafka, Redis and DNS, the enrich worker also vLLM (and public
    https image hosts), the judge its judge endpoint; vLLM takes requests from the enrich worker only, and every
    metrics port admits the monitoring namespace."""
    docs = rendered(name)
    policies = of_kind(docs, "NetworkPolicy")
    deny = named(docs, "NetworkPolicy", "opal-default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")}

    def egress_ports(labels: dict[str, str]) -> set[int]:
        return {
            p["port"]
            for pol in policies
            if "Egress" in pol["spec"]["policyTypes"] and selects(pol["spec"]["podSelector"], labels)
            for rule in pol["spec"].get("egress", [])
            for p in rule.get("ports", [])
        }

    allowed = {
        "opal-enrich-worker": {53, 9092, 9093, 6379, 8000, 443},
        "opal-indexer": {53, 9092, 9093, 6379},
        "opal-judge": {53, 9092, 9093, 6379, 8000, 443},
        "opal-preference-builder": {53, 9092, 9093, 6379},
        "opal-vllm": {53},
    }
    assert {n: egress_ports(labels) for n, labels in pods.items()} == allowed
    ingress_to_vllm = {
        p["metadata"]["name"]
        for p in policies
        if "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], pods["opal-vllm"])
    }
    assert ingress_to_vllm == {"opal-default-deny", "opal-vllm-ingress", "opal-metrics-ingress"}
    (rule,) = named(docs, "NetworkPolicy", "opal-vllm-ingress")["spec"]["ingress"]
    assert [f["podSelector"]["matchLabels"] for f in rule["from"]] == [{"app.kubernetes.io/name": "opal-enrich-worker"}]
    metrics = named(docs, "NetworkPolicy", "opal-metrics-ingress")["spec"]
    assert all(selects(metrics["podSelector"], labels) for labels in pods.values())
    assert {p["port"] for p in metrics["ingress"][0]["ports"]} == {METRICS_PORT, VLLM_PORT}


# -- Prometheus, alerts, dashboard ------------------------------------------------------------------------------
@cache
def exported_series() -> dict[str, set[str]]:
    """Sample name -> label names, from every metrics class of workers/metrics.py in a fresh registry (one child
    per labelled metric, so each exposes its samples: counters _total/_created, histograms _bucket/_sum/_count)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    import workers.metrics as wm

    classes = [c for c in vars(wm).values() if isinstance(c, type) and issubclass(c, wm._Metrics) and c is not wm._Metrics]
    assert {wm.WorkerMetrics, wm.IndexerMetrics, wm.JudgeMetrics} <= set(classes)
    out: dict[str, set[str]] = {}
    for cls in classes:
        m = cls(registry=CollectorRegistry())
        for metric in vars(m).values():
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:
                metric.labels(*["x"] * len(metric._labelnames))
        for family in m.registry.collect():
            for sample in family.samples:
                out.setdefault(sample.name, set()).update(sample.labels)
    return out


_GROUPING = r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan"}


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every vector selector in a PromQL expression."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals emptied (a brace in a regex is no selector)
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges, subqueries, Grafana's $__rate_interval
    s = re.sub(_GROUPING, " ", s)
    s = re.sub(r"\boffset\s+\w+", "", s)
    out = []
    for m in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?", s):
        name, braces = m.group(1), m.group(2) or ""
        if name in _KEYWORDS or (not braces and s[m.end() :].lstrip().startswith("(")):
            continue
        out.append((name, set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", braces))))
    return out


def test_selector_extraction() -> None:
    assert selectors('sum by (a) (rate(x_total{b="c{}", d!~"e"}[5m] offset 1h)) / clamp_min(y, 1e-9) > 0.5 and on() vector(1)') == [
        ("x_total", {"b", "d"}),
        ("y", set()),
    ]
    assert selectors('histogram_quantile(0.95, sum by (le) (rate(h_bucket{n=~"$namespace"}[$__rate_interval])))') == [("h_bucket", {"n"})]


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every alert rule and every dashboard query (templating label_values() included)."""
    for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]
    dash = json.loads((DEPLOY / "grafana" / "opal-dashboard.json").read_text())
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            yield f"panel {panel['title']!r}", t["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
            assert m, var["definition"]
            yield f"variable {var['name']}", m.group(1)


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    series = exported_series() | PROMETHEUS_BUILTINS
    used = set()
    for where, expr in queries():
        found = selectors(expr)
        assert found, f"{where}: no metric in {expr!r}"
        for name, labels in found:
            assert name in series, f"{where}: {name} is not exported by workers/metrics.py"
            assert labels <= series[name] | TARGET_LABELS, f"{where}: {name} has no label {sorted(labels - series[name] - TARGET_LABELS)}"
            used.add(name)
        known = set().union(*(series[n] for n, _ in found)) | TARGET_LABELS
        grouped = {g.strip() for m in re.finditer(_GROUPING, expr) for g in m.group(0).split("(", 1)[1].rstrip(")").split(",")} - {""}
        assert grouped <= known, f"{where}: grouped by labels no selected metric has: {sorted(grouped - known)}"
    # the dashboard and alerts together cover what a stuck or failing pipeline shows
    for must in ("opal_enrich_lag", "opal_enrich_commit_lag", "opal_enrich_oldest_in_flight_seconds", "opal_enrich_dead_letters_total"):
        assert must in used, must
    assert any(n.startswith("opal_index_") for n in used) and any(n.startswith("opal_judge_") for n in used)


def test_alert_rules_pass_promtool() -> None:
    promtool = tool("promtool")
    out = run(promtool, "check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out
    out = run(promtool, "test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out
    names = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    for must in ("OpalEnrichLagGrowing", "OpalEnrichDeadLetterRate", "OpalStuckOffset", "OpalOldestInFlight", "OpalModelErrorRate"):
        assert must in names
    assert {"OpalCacheErrors", "OpalModelBreakerOpen", "OpalIndexRedisBreakerOpen"} <= names


K8S_SD_KEYS = {"role", "namespaces", "selectors", "api_server", "kubeconfig_file", "attach_metadata", "follow_redirects", "tls_config"}


def test_prometheus_configs_pass_promtool(tmp_path: Path) -> None:
    """The compose config as it is; the Kubernetes one with its kubernetes_sd_configs (Debian builds promtool
    without Kubernetes discovery) checked on their own and replaced by a static target for promtool, so the
    relabelling, rule files and the rest still go through promtool."""
    promtool = tool("promtool")
    out = run(promtool, "check", "config", "prometheus-compose.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out
    compose_jobs = {c["job_name"] for c in yaml.safe_load((DEPLOY / "prometheus" / "prometheus-compose.yml").read_text())["scrape_configs"]}
    assert compose_jobs == {*STREAM_COMMANDS.keys() - {"opal-preference-builder"}, "opal-vllm"}

    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for scrape in config["scrape_configs"]:
        for sd in scrape.pop("kubernetes_sd_configs", []):
            assert set(sd) <= K8S_SD_KEYS and sd["role"] == "pod", sd
            assert set(sd["namespaces"]["names"]) == {"opal-dev", "opal-prod"}
            scrape.setdefault("static_configs", []).append({"targets": ["pod.example:9100"]})
        relabel = {tuple(r.get("source_labels", [])): r for r in scrape["relabel_configs"]}
        assert relabel[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
        assert relabel[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]["target_label"] == "job"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "alerts.yml").write_text((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert "SUCCESS" in run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    # the Kubernetes job label is app.kubernetes.io/name: the scraped Deployments are the compose jobs
    scraped = {
        d["metadata"]["name"]
        for d in of_kind(rendered("base"), "Deployment")
        if d["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"
    }
    assert scraped == compose_jobs


def test_grafana_dashboard_is_provisioned_over_prometheus() -> None:
    dash = json.loads((DEPLOY / "grafana" / "opal-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    grafana = compose()["services"]["grafana"]
    mounts = [v for v in grafana["volumes"]]
    sources = {Path(str(v["source"] if isinstance(v, dict) else v.split(":")[0])) for v in mounts}
    assert DEPLOY / "grafana" / "opal-dashboard.json" in sources and DEPLOY / "grafana" / "provisioning" in sources


# -- compose ----------------------------------------------------------------------------------------------------
def test_compose_runs_the_system_on_one_gpu_host() -> None:
    services = compose()["services"]
    assert {
        "kafka",
        "redis",
        "vllm",
        "topology",
        "enrich-worker",
        "indexer",
        "judge",
        "preference-builder",
        "prometheus",
        "grafana",
    } <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:") and kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    (device,) = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["enrich-worker"]["depends_on"]["vllm"] == {"condition": "service_healthy"}
    for n, spec in services.items():
        image = spec["image"]
        assert ":" in image and not image.endswith(":latest"), n
        for v in spec.get("volumes", []):  # bind mounts point at files that exist
            src = v["source"] if isinstance(v, dict) else v.split(":")[0]
            if str(src).startswith("/"):
                assert Path(src).exists(), (n, src)


# -- images -----------------------------------------------------------------------------------------------------
def dockerignore_allows(ignore: Path, path: str) -> bool:
    """Whether an allow-list .dockerignore ("*" then "!path" lines) lets ``path`` into the build context."""
    allowed = [line[1:].rstrip("/") for line in ignore.read_text().splitlines() if line.startswith("!")]
    return any(path == a or path.startswith(a + "/") for a in allowed)


@pytest.mark.parametrize(("image", "extra"), [("stream.Dockerfile", "stream"), ("model.Dockerfile", "model-gpu")])
def test_dockerfiles(image: str, extra: str) -> None:
    """Pinned base image, the pyproject extra of its side, every COPY source in the build context, a non-root
    user, a health check and an entry point."""
    import tomllib

    instructions = dockerfile(image)
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    assert all(a.split()[0] == "${PYTHON_IMAGE}" for i, a in instructions if i == "FROM")
    installs = [a for i, a in instructions if i == "RUN" and "pip install" in a]
    assert len(installs) == 1 and f'pip install ".[{extra}]"' in installs[0], installs
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = pyproject["project"]["optional-dependencies"][extra]
    if extra == "stream":
        assert not any(d.startswith(("torch", "vllm")) for d in deps)
    else:
        assert any(d.startswith("vllm==") for d in deps)
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = [a.split()[0] for i, a in instructions if i == "COPY" and not a.startswith("--from")]
    assert set(packages) <= set(copied), "every package's source is in the build stage"
    # the wheel carries every data file the packages hold (else the image lacks them): each tracked non-Python file
    # under a package matches its package-data globs in pyproject.toml
    data_globs = pyproject["tool"]["setuptools"]["package-data"]
    tracked = subprocess.run(["git", "ls-files", *packages], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in (Path(t) for t in tracked if not t.endswith(".py")):
        top, rest = f.parts[0], Path(*f.parts[1:])
        assert any(rest.match(g) and len(rest.parts) == len(Path(g).parts) for g in data_globs.get(top, [])), (
            f"{f} is not package data in pyproject.toml: an installed (non-editable) OPAL would lack it"
        )
    ignore = DEPLOY / "docker" / f"{image}.dockerignore"
    for i, a in instructions:
        if i == "COPY" and not a.startswith("--from"):
            *srcs, _dest = a.split()
            for src in srcs:
                assert (REPO / src).exists(), src
                assert dockerignore_allows(ignore, src), f"{ignore.name} keeps {src} out of the context"
    users = [a for i, a in instructions if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert any(i == "HEALTHCHECK" for i, _ in instructions)
    assert any(i == "ENTRYPOINT" for i, _ in instructions)


def test_readme_describes_what_is_there() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "not here yet" not in readme
    for path in (
        "docker/stream.Dockerfile",
        "docker/model.Dockerfile",
        "k8s/base",
        "k8s/overlays/prod",
        "k8s/jobs/backfill.yaml",
        "compose/docker-compose.yml",
        "prometheus/alerts.yml",
        "grafana/opal-dashboard.json",
        "scripts/install_tools.sh",
    ):
        assert (DEPLOY / path).exists(), path
        assert path in readme, f"deploy/README.md does not mention {path}"
