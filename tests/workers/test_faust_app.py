"""The faust agents connect with the same Kafka security settings as the librdkafka workers, or refuse clearly."""

from __future__ import annotations

import faust
import pytest

from schemas.settings import KafkaSettings
from workers.faust_app import faust_credentials


def test_plaintext_needs_no_credentials() -> None:
    assert faust_credentials(KafkaSettings(bootstrap="k:9092")) is None


def test_sasl_scram_over_tls() -> None:
    k = KafkaSettings(
        bootstrap="k:9096", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="opal", sasl_password="pw"
    )
    c = faust_credentials(k)
    assert isinstance(c, faust.SASLCredentials)
    assert (c.username, c.password, c.mechanism.value, c.ssl_context is not None) == ("opal", "pw", "SCRAM-SHA-512", True)
    plain = faust_credentials(k.model_copy(update={"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"}))
    assert isinstance(plain, faust.SASLCredentials) and plain.ssl_context is None


def test_tls_only() -> None:
    assert isinstance(faust_credentials(KafkaSettings(bootstrap="k:9093", security_protocol="SSL")), faust.SSLCredentials)


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"}, "not OAUTHBEARER"),
        ({"security_protocol": "SSL", "ssl_key_pem": "-----BEGIN"}, "as files"),
    ],
)
def test_what_the_agents_cannot_apply_is_refused(update: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        faust_credentials(KafkaSettings(bootstrap="k:9092").model_copy(update=update))


def test_librdkafka_overrides_are_named_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    k = KafkaSettings(bootstrap="k:9092", overrides={"socket.keepalive.enable": "true", "sasl.password": "s3cret"})
    assert faust_credentials(k) is None
    assert "sasl.password, socket.keepalive.enable" in caplog.text and "s3cret" not in caplog.text
