from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from schemas.settings import KafkaSettings, OpalSettings


def test_env_names_map_to_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPAL_KAFKA_BOOTSTRAP", "broker-1:9092,broker-2:9092")
    monkeypatch.setenv("OPAL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("OPAL_KAFKA_OVERRIDES", '{"socket.keepalive.enable": "true"}')
    monkeypatch.setenv("OPAL_REDIS_URL", "redis://:pw@cache:6379/2")
    monkeypatch.setenv("OPAL_VLLM_ENDPOINTS", '["http://vllm-0:8000/v1", "http://vllm-1:8000/v1"]')
    monkeypatch.setenv("OPAL_WORKER_MAX_IN_FLIGHT", "128")
    monkeypatch.setenv("OPAL_TOPICS_ASPECTS", "prod.aspects")
    s = OpalSettings()
    assert s.kafka.bootstrap == "broker-1:9092,broker-2:9092"
    assert s.kafka.security_protocol == "SASL_SSL"
    assert s.kafka.overrides == {"socket.keepalive.enable": "true"}
    assert s.redis.url_value() == "redis://:pw@cache:6379/2"
    assert s.vllm.endpoints == ["http://vllm-0:8000/v1", "http://vllm-1:8000/v1"]
    assert s.worker.max_in_flight == 128
    assert s.topics.aspects == "prod.aspects"


def test_settings_are_frozen() -> None:
    s = OpalSettings()
    with pytest.raises(ValidationError):
        s.kafka.bootstrap = "x:1"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.kafka = KafkaSettings()  # type: ignore[misc]


def test_secrets_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPAL_KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("OPAL_REDIS_URL", "redis://:topsecret@cache:6379/0")
    monkeypatch.setenv("OPAL_VLLM_API_KEY", "sk-abc")
    s = OpalSettings()
    shown = repr(s) + str(s) + repr(s.describe()) + s.model_dump_json()
    for secret in ("hunter2", "topsecret", "sk-abc"):
        assert secret not in shown
    assert isinstance(s.kafka.sasl_password, SecretStr)


def test_librdkafka_config_reveals_secrets_and_overrides_win() -> None:
    k = KafkaSettings(
        bootstrap="b:1",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password=SecretStr("p"),
        overrides={"acks": "1"},
    )
    conf = k.librdkafka_config(**{"acks": "all", "group.id": "g"})
    assert conf["sasl.password"] == "p"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["acks"] == "1"  # operator override beats code
    assert conf["group.id"] == "g"


def test_unset_bootstrap_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="OPAL_KAFKA_BOOTSTRAP"):
        KafkaSettings().librdkafka_config()


def test_bad_values_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPAL_VLLM_ENDPOINTS", '["vllm:8000"]')
    with pytest.raises(ValidationError, match="http"):
        OpalSettings()
    monkeypatch.delenv("OPAL_VLLM_ENDPOINTS")
    monkeypatch.setenv("OPAL_KAFKA_SECURITY_PROTOCOL", "TLS")
    with pytest.raises(ValidationError):
        OpalSettings()


def test_every_field_documented() -> None:
    for name, _value, desc in OpalSettings().describe():
        assert desc, f"{name} has no description"
