"""wattlog.redact: the one redaction module (issue 12, item 2)."""

from __future__ import annotations

import pytest

from wattlog import redact
from wattlog.redact import is_secret_name, redact_override, redact_overrides, redact_text, redact_uri

PW = "CANARYpw7361"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (f"https://user:{PW}@host:5000/x?token=abc&a=1", "https://host:5000/x?token=***&a=1"),
        (f"http://user:{PW}@127.0.0.1:5000", "http://127.0.0.1:5000"),
        (f"postgresql+psycopg2://ml:{PW}@db:5432/mlflow?sslpassword=x", "postgresql+psycopg2://db:5432/mlflow?sslpassword=***"),
        ("s3://b/k?X-Amz-Signature=s1&X-Amz-Credential=c1&x=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***&x=1"),
        ("https://h/a?auth=a1&credential=c1&sig=s1&api_key=k1&password=p1&tokenizer=bert",
         "https://h/a?auth=***&credential=***&sig=***&api_key=***&password=***&tokenizer=bert"),
        ("https://h/a?access_token=t#frag", "https://h/a?access_token=***#frag"),
        (f"http://u%40x:{PW}%3A@h/", "http://h/"),
        (f"http://user:{PW}/slash@h/", "http://h/"),  # a malformed authority still loses its password
        ("sqlite:////tmp/m.db", "sqlite:////tmp/m.db"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
        ("file:///home/a@b/x", "file:///home/a@b/x"),
        ("http://host/a@b", "http://host/a@b"),
        ("databricks", "databricks"),
        ("", ""),
        (None, ""),
    ],
)
def test_redact_uri(uri, expected) -> None:
    assert redact_uri(uri) == expected
    assert PW not in redact_uri(uri)


def test_spool_and_sink_reexport_the_one_module() -> None:
    from wattlog.sinks import spool

    assert spool.redact_uri is redact.redact_uri and spool.redact_text is redact.redact_text


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("token", True), ("access_token", True), ("MLFLOW_TRACKING_TOKEN", True), ("hfToken", True),
        ("password", True), ("db.password", True), ("dbPassword", True), ("passwd", True), ("pwd", True),
        ("secret", True), ("client_secret_id", True), ("api_key", True), ("apiKey", True), ("key", True),
        ("AWS_SECRET_ACCESS_KEY", True), ("credential", True), ("X-Amz-Credential", True), ("auth", True),
        ("X-Amz-Signature", True), ("sig", True), ("Authorization", True),
        ("tokenizer", False), ("max_tokens", False), ("key_dim", False), ("keyboard", False),
        ("prune.amount", False), ("author", False), ("SSH_AUTH_SOCK", False), ("energy.pue", False),
        ("", False),
    ],
)
def test_is_secret_name(name, secret) -> None:
    assert is_secret_name(name) is secret


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"MLFlowLogger failed: https://u:{PW}@host/api", "MLFlowLogger failed: https://host/api"),
        (f"token={PW} tokenizer=bert max_tokens=5", "token=*** tokenizer=bert max_tokens=5"),
        (f"POST https://h/x?a=1&password={PW} failed", "POST https://h/x?a=1&password=*** failed"),
        (f"Authorization: Bearer {PW}abc", "Authorization: Bearer ***"),
        ("KeyError: 'energy/total_j'", "KeyError: 'energy/total_j'"),
        ("nothing to hide", "nothing to hide"),
    ],
)
def test_redact_text(text, expected) -> None:
    assert redact_text(text) == expected


def test_redact_text_hides_values_of_secret_environment_variables(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-CANARY-1")
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "pw-CANARY-2")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret: left alone in text
    out = redact_text("sent tok-CANARY-1 and pw-CANARY-2; false")
    assert out == "sent *** and ***; false"
    assert redact_uri("http://h/?x=tok-CANARY-1") == "http://h/?x=***"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (f"mlflow.tracking_uri=http://user:{PW}@h:5000", "mlflow.tracking_uri=http://h:5000"),
        (f"+db.password={PW}", "+db.password=***"),
        (f"++hf_token={PW}", "++hf_token=***"),
        (f"db@backup.password={PW}", "db@backup.password=***"),  # group@package=value
        ("db@backup=mysql", "db@backup=mysql"),
        (f"logger.tracking_uri=https://h/?token={PW}", "logger.tracking_uri=https://h/?token=***"),
        ("prune.amount=0.3,0.6", "prune.amount=0.3,0.6"),
        (f"logger.tracking_uri=http\\://u\\:{PW}@127.0.0.1\\:5000", "logger.tracking_uri=http://127.0.0.1:5000"),
        ("name=a\\,b", "name=a\\,b"),  # Hydra's escapes stay when there is nothing to hide
        ("model.tokenizer=bert-base", "model.tokenizer=bert-base"),
        ("model.key_dim=64", "model.key_dim=64"),
        ("~energy", "~energy"),
        ("quantize=int8", "quantize=int8"),
    ],
)
def test_redact_override(override, expected) -> None:
    assert redact_override(override) == expected
    assert redact_overrides([override, "a=1"]) == [expected, "a=1"]
