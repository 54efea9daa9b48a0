"""No secret shows anywhere: a canary set through every secret-bearing setting must not appear in
`opal settings` (table and Markdown), repr/str/JSON of the settings, validation errors, or a DEBUG-level
enrichment worker's stdout, stderr, /metrics and dead letters. The secrets still reach the clients
(``librdkafka_config()``, ``url_value()``, ``get_secret_value()``)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from opal.embedded import EmbeddedStack, free_port
from opal.samples import load_samples, sample_event
from schemas.events import DeadLetter, ListingImageEvent
from schemas.serde import EventCodec, SchemaRegistryClient
from schemas.settings import MASK, KafkaSettings, OpalSettings, is_secret_key, mask_url
from tests.support import REPO, opal_bin, publish, settings_env

CANARY = "CANARY-" + uuid.uuid4().hex

# librdkafka accepts all of these on a PLAINTEXT connection (it only uses them for SASL/SSL)
CLIENT_OVERRIDES = {
    "sasl.password": CANARY,
    "ssl.key.password": CANARY,
    "sasl.oauthbearer.client.secret": CANARY,
    "ssl.keystore.password": CANARY,
    "sasl.oauthbearer.config": f"principal=opal secret={CANARY}",
    "socket.keepalive.enable": "true",
}
# not librdkafka properties (a client would refuse them), but operators paste them: printed masked all the same
FOREIGN_OVERRIDES = {
    "sasl.jaas.config": f'PlainLoginModule required password="{CANARY}";',
    "ssl_key": CANARY,
    "basic.auth.user.info": CANARY,
}


def canary_env(redis_url: str = f"redis://:{CANARY}@127.0.0.1:6379/0", *, printable_only: bool = True) -> dict[str, str]:
    """Every secret-bearing OPAL_* variable set to (or holding) the canary.

    ``printable_only=False`` leaves out what a running worker cannot accept: the schema registry URL
    (it would contact the registry) and overrides librdkafka does not know.
    """
    overrides = CLIENT_OVERRIDES | (FOREIGN_OVERRIDES if printable_only else {})
    env = {
        "OPAL_KAFKA_SASL_USERNAME": "opal",
        "OPAL_KAFKA_SASL_PASSWORD": CANARY,
        "OPAL_KAFKA_OVERRIDES": json.dumps(overrides),
        "OPAL_KAFKA_SCHEMA_REGISTRY_AUTH": f"opal:{CANARY}",
        "OPAL_KAFKA_SSL_KEY_PASSWORD": CANARY,
        "OPAL_KAFKA_SSL_KEY_PEM": f"-----BEGIN PRIVATE KEY-----\n{CANARY}\n-----END PRIVATE KEY-----",
        "OPAL_KAFKA_SASL_OAUTHBEARER_METHOD": "oidc",
        "OPAL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "opal-client",
        "OPAL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": CANARY,
        "OPAL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp.example/oauth2/token",
        "OPAL_REDIS_URL": redis_url,
        "OPAL_VLLM_API_KEY": CANARY,
        "OPAL_JUDGE_API_KEY": CANARY,
    }
    if printable_only:
        env["OPAL_KAFKA_SCHEMA_REGISTRY_URL"] = f"https://opal:{CANARY}@registry.example:8081"
    return env


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([opal_bin(), *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=120)


# -- printing the settings ------------------------------------------------------------------


@pytest.mark.parametrize("markdown", [False, True], ids=["table", "markdown"])
def test_opal_settings_prints_no_secret(cli_env: dict[str, str], markdown: bool) -> None:
    # wide enough that the table folds no cell: a canary split over two lines would escape the check
    r = _run_cli(["settings", *(["--markdown"] if markdown else [])], cli_env | canary_env() | {"COLUMNS": "5000"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CANARY" not in r.stdout + r.stderr
    # the keys and the non-secret values still show; the secrets show as the mask
    for shown in ("sasl.password", "sasl.oauthbearer.client.secret", "ssl_key", "socket.keepalive.enable", "registry.example:8081", MASK):
        assert shown in r.stdout, shown
    assert "opal-client" in r.stdout  # a client id is not a secret


def test_repr_str_and_json_of_settings_hold_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in canary_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OPAL_KAFKA_BOOTSTRAP", "kafka-1:9092")
    s = OpalSettings()
    k = s.kafka
    shown = [repr(s), str(s), f"{s}", repr(k), str(k), repr(k.overrides), str(k.overrides), s.model_dump_json(), repr(s.describe())]
    shown += [repr(s.redis), repr(s.vllm), k.schema_registry_url or "", s.redis.url_display()]
    for text in shown:
        assert CANARY not in text
    # ... and the clients still get every one of them
    conf = k.librdkafka_config()
    for key in ("sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret", "ssl.keystore.password", "ssl_key"):
        assert conf[key] == CANARY, key
    assert CANARY in conf["ssl.key.pem"] and CANARY in conf["sasl.jaas.config"]
    assert conf["sasl.oauthbearer.method"] == "oidc" and conf["sasl.oauthbearer.client.id"] == "opal-client"
    assert conf["socket.keepalive.enable"] == "true"
    assert k.schema_registry_auth is not None and k.schema_registry_auth.get_secret_value() == f"opal:{CANARY}"  # explicit auth wins
    assert k.schema_registry_url == "https://registry.example:8081"  # userinfo taken off the URL
    assert s.redis.url_value() == f"redis://:{CANARY}@127.0.0.1:6379/0"
    assert s.redis.url_display() == f"redis://:{MASK}@127.0.0.1:6379/0"
    assert s.vllm.api_key is not None and s.vllm.api_key.get_secret_value() == CANARY


def test_registry_userinfo_becomes_auth() -> None:
    k = KafkaSettings(schema_registry_url=f"https://opal:{CANARY}%40x@registry:8081/")
    assert k.schema_registry_url == "https://registry:8081/" and CANARY not in repr(k)
    assert k.schema_registry_auth is not None and k.schema_registry_auth.get_secret_value() == f"opal:{CANARY}@x"
    client = SchemaRegistryClient(f"https://opal:{CANARY}@registry:8081")  # the client strips it too (model_copy skips validators)
    assert client.url == "https://registry:8081" and CANARY not in repr(vars(client))


def test_overrides_copied_in_unvalidated_are_still_masked_by_describe() -> None:
    s = OpalSettings()
    k = s.kafka.model_copy(update={"overrides": {"sasl.password": CANARY, "linger.ms": "5"}})  # model_copy skips validation
    rows = {name: value for name, value, _ in s.model_copy(update={"kafka": k}).describe()}
    assert CANARY not in rows["OPAL_KAFKA_OVERRIDES"] and "linger.ms" in rows["OPAL_KAFKA_OVERRIDES"]


@pytest.mark.parametrize(
    "key",
    [
        "sasl.password",
        "SASL.PASSWORD",
        "ssl.key.password",
        "ssl.keystore.password",
        "ssl.key.pem",
        "ssl_key",
        "sasl.jaas.config",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.extensions",
        "basic.auth.user.info",
        "bearer.auth.token",
        "aws_secret_access_key",
        "some.credentials.file",
        "api_key",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["bootstrap.servers", "ssl.key.location", "ssl.ca.location", "linger.ms", "socket.keepalive.enable"])
def test_plain_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_mask_url() -> None:
    assert mask_url(f"https://u:{CANARY}@h:1/p?a=1") == f"https://u:{MASK}@h:1/p?a=1"
    assert mask_url(f"https://{CANARY}@h/") == f"https://{MASK}@h/"
    assert CANARY not in mask_url(f"https://h/?token={CANARY}&a=1") and "a=1" in mask_url(f"https://h/?token={CANARY}&a=1")
    assert mask_url("http://vllm-0:8000/v1") == "http://vllm-0:8000/v1"
    assert mask_url(f"http://[bad@{CANARY}") == MASK


def test_every_secret_looking_field_is_a_secretstr() -> None:
    """A new field named like a credential must be SecretStr, or repr and `opal settings` would print it
    (URLs and paths excepted: describe() masks userinfo, a path is no secret)."""
    for group in OpalSettings.model_fields.values():
        model: Any = group.annotation
        for name, f in model.model_fields.items():
            if name.endswith(("_url", "_location")):
                continue
            words = set(name.split("_"))
            if words & {"password", "secret", "auth", "token", "credential", "credentials"} or name.endswith(("api_key", "key_pem")):
                assert "SecretStr" in str(f.annotation), name


# -- validation errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"OPAL_KAFKA_SECURITY_PROTOCOL": "TLS"},
        {"OPAL_KAFKA_SASL_MECHANISM": "GSSAPI"},
        {"OPAL_KAFKA_OVERRIDES": json.dumps({"sasl.password": CANARY, "linger.ms": [5]})},
        {"OPAL_KAFKA_OVERRIDES": json.dumps([CANARY])},
        {"OPAL_KAFKA_OVERRIDES": '{"sasl.password": "' + CANARY + '"'},  # not JSON
        {"OPAL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": ""},  # oidc incomplete: a model-level error
        {"OPAL_REDIS_CACHE_TTL_S": "0"},
        {"OPAL_VLLM_ENDPOINTS": json.dumps([f"ftp://u:{CANARY}@h/v1"])},
        {"OPAL_VLLM_REQUEST_TIMEOUT_S": "soon"},
    ],
    ids=lambda d: next(iter(d)),
)
def test_validation_errors_hold_no_secret(monkeypatch: pytest.MonkeyPatch, bad: dict[str, str]) -> None:
    for k, v in (canary_env() | bad).items():
        monkeypatch.setenv(k, v)
    with pytest.raises((ValidationError, ValueError)) as info:
        OpalSettings()
    chain: list[BaseException] = []
    e: BaseException | None = info.value
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for exc in chain:
        assert CANARY not in str(exc) and CANARY not in repr(exc), type(exc)


def test_cli_with_invalid_settings_prints_no_secret(cli_env: dict[str, str]) -> None:
    r = _run_cli(["settings"], cli_env | canary_env() | {"OPAL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": ""})
    assert r.returncode != 0
    assert "OPAL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL" in r.stdout + r.stderr
    assert CANARY not in r.stdout + r.stderr


# -- a running worker ------------------------------------------------------------------------


def _read_raw(s: OpalSettings, topic: str, n: int, timeout_s: float = 60) -> list[tuple[bytes, bytes, bytes]]:
    """(key, value, headers joined) of the first ``n`` records of ``topic``, as raw bytes."""
    from workers.kafka_clients import make_consumer

    c = make_consumer(s.kafka, f"raw-{uuid.uuid4().hex[:6]}")
    c.subscribe([topic])
    out: list[tuple[bytes, bytes, bytes]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            m = c.poll(0.3)
            if m is None or m.error():
                continue
            headers = b"".join(k.encode() + (v or b"") for k, v in (m.headers() or []))
            out.append((m.key() or b"", m.value() or b"", headers))
    finally:
        c.close()
    return out


def _total(metrics: str, name: str) -> float:
    """Sum of every sample of counter ``name`` (without ``_total``) in a /metrics body."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(metrics) if f.name == name for s in f.samples if s.name == name + "_total")


def _scrape_until(port: int, done: Callable[[str], bool], timeout_s: float = 60) -> str:
    """The first /metrics body for which ``done`` holds; the last one read once ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                body = resp.read().decode()
        except OSError:
            pass
        if body and done(body):
            break
        time.sleep(0.3)
    return body


@pytest.mark.parametrize(
    "redis_user",
    # valkey's default user has no password, so AUTH <canary> is accepted and the cache works; a named user that does
    # not exist is refused (WRONGPASS), so the cache fails and its errors are logged and counted
    ["", "opal-no-such-user"],
    ids=["auth-accepted", "auth-refused"],
)
def test_debug_worker_leaks_no_secret(stack: EmbeddedStack, settings: OpalSettings, cli_env: dict[str, str], redis_user: str) -> None:
    """`opal worker enrich --log-level DEBUG` with every secret set: stdout, stderr, /metrics and dead letters hold none."""
    from topology.admin import apply_topology
    from topology.declared import build_topology
    from workers.kafka_clients import make_admin

    s = settings.model_copy(update={"worker": settings.worker.model_copy(update={"group_id": f"secrets-{uuid.uuid4().hex[:6]}"})})
    apply_topology(make_admin(s.kafka), build_topology(s))
    sample = load_samples()[0]
    images = sample.image.parent
    good = sample_event(sample).model_copy(update={"listing_id": "good-1"})
    bad = [(f"bad-{i}".encode(), b"\xc3\x01not avro " + bytes([i])) for i in range(3)]
    # valid: goes to the cache (AUTH with the canary) and then waits for the model, which is down (never dead-lettered)
    publish(s, s.topics.images_realtime, [*bad, (b"good-1", EventCodec(ListingImageEvent).encode(good))])

    valkey = stack.settings.redis.url_value()  # redis://127.0.0.1:PORT[/db], no password
    host_port = valkey.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    port = free_port()

    def reached_both(m: str) -> bool:
        """The good record went through both secret-holding dependencies: valkey (AUTH with the canary password) and
        the model endpoint (bearer canary; nothing listens there, so the record waits and is never dead-lettered)."""
        cache = _total(m, "opal_enrich_cache_misses") + _total(m, "opal_enrich_cache_hits") + _total(m, "opal_enrich_cache_errors")
        return cache > 0 and _total(m, "opal_enrich_model_requests") > 0

    env = settings_env(s, cli_env) | canary_env(f"redis://{redis_user}:{CANARY}@{host_port}/0", printable_only=False)
    env |= {
        "OPAL_VLLM_ENDPOINTS": json.dumps([f"http://127.0.0.1:{free_port()}/v1"]),  # nothing listens there
        "OPAL_VLLM_MODEL": "opal-tiny",
        "OPAL_VLLM_MAX_RETRIES": "0",
        "OPAL_WORKER_GROUP_ID": s.worker.group_id,
        "OPAL_WORKER_ALLOWED_FILE_ROOT": str(images),
        "OPAL_WORKER_MAX_ATTEMPTS": "1",
        "OPAL_WORKER_RETRY_BACKOFF_S": "0.05",
        "PYTHONASYNCIODEBUG": "1",
        # librdkafka's own debug output too (it redacts sensitive properties itself)
        "OPAL_KAFKA_OVERRIDES": json.dumps(CLIENT_OVERRIDES | {"debug": "conf,security,broker"}),
    }
    worker = subprocess.Popen(
        [opal_bin(), "worker", "enrich", "--log-level", "DEBUG", "--metrics-port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        dead = _read_raw(s, s.topics.dead_letters, len(bad), timeout_s=120)
        metrics = _scrape_until(port, reached_both)
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=90)
    assert worker.returncode == 0, err[-3000:]
    assert sorted(EventCodec(DeadLetter).decode(value).error_kind for _, value, _ in dead) == ["unknown_schema"] * len(bad)
    assert "DEBUG" in err  # the run really was at DEBUG
    assert reached_both(metrics), metrics
    for where, text in {"stdout": out, "stderr": err, "/metrics": metrics}.items():
        assert CANARY not in text, f"canary in {where}: ...{text[max(0, text.find(CANARY) - 300) : text.find(CANARY) + 100]}"
    for key, value, headers in dead:
        assert CANARY.encode() not in key + value + headers


def test_a_judge_endpoint_with_credentials_is_refused_without_echoing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPAL_JUDGE_ENDPOINT", f"https://opal:{CANARY}@judge.example/v1")
    with pytest.raises(ValueError, match="OPAL_JUDGE_API_KEY") as e:
        OpalSettings()
    assert CANARY not in str(e.value)


def test_canary_env_is_complete() -> None:
    """Every SecretStr field of the settings is exercised by canary_env (a new secret gets a canary too)."""
    env = canary_env()
    for group_name, group in OpalSettings.model_fields.items():
        model: Any = group.annotation
        for name, f in model.model_fields.items():
            if "SecretStr" in str(f.annotation):
                assert f"OPAL_{group_name.upper()}_{name.upper()}" in env, name
