"""Credential redaction: the one place that decides what a secret looks like (no third-party imports).

Everything wattlog writes (params, tags, run names, spool files, sweep files, CSVs, warnings, logs,
CLI errors) passes through these functions first:

- :func:`redact_uri`: a URI without its userinfo (``user:password@`` is removed, so the result still
  works as a tracking URI when the credentials come from the environment) and with the values of
  secret-looking query parameters replaced by ``***`` (``?token=***&a=1``);
- :func:`redact_text`: free text (an exception message): userinfo of every URI in it, secret query
  values, ``name=value`` pairs whose name looks secret, and the values of secret environment
  variables (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``, ...);
- :func:`redact_override` / :func:`redact_overrides`: Hydra override strings (``key=value``): the
  whole value when the key names a secret (``db.password=***``), else the value through
  :func:`redact_text` (``mlflow.tracking_uri=http://host``).

A name "looks secret" (:func:`is_secret_name`) when, split into words at ``.``, ``_``, ``-`` and
camelCase, any word is (or ends in) ``password``, ``passwd``, ``secret``, ``credential(s)``,
``authorization``, ``signature``, ``apikey``, ``accesskey``, ``token`` ..., or its last word is ``token``,
``key``, ``sig``, ``auth``, ``pwd``, ``cookie``, ``sas`` or ``cred``: ``access_token``, ``db.password``,
``X-Amz-Signature``, ``api_key``, ``auth`` are secret; ``tokenizer``, ``max_tokens``, ``key_dim`` are not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

__all__ = [
    "MASK",
    "is_secret_name",
    "redact_override",
    "redact_overrides",
    "redact_text",
    "redact_uri",
]

MASK = "***"
# a secret wherever the word appears in the name
_STRONG_WORDS = frozenset({
    "password", "passwords", "passwd", "secret", "secrets", "credential", "credentials", "authorization",
    "signature", "apikey", "jwt", "bearer",
})
# a secret when the name ends with the word: ``api_key`` is, ``key_dim`` is not
_LAST_WORDS = frozenset({"token", "key", "keys", "sig", "auth", "pwd", "cookie", "sas", "cred", "creds"})
_SECRET_SUFFIXES = ("password", "passwd", "token", "secret", "credential", "credentials", "apikey", "accesskey",
                    "privatekey", "secretkey")
_WORD_RE = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
# userinfo: everything up to the last '@' of the authority (which ends at the first / ? # or space)
_USERINFO_RE = re.compile(rf"(?P<scheme>{_SCHEME})(?P<userinfo>[^/?#\s@]*(?:@[^/?#\s@]*)*)@(?=[^/?#\s@]*)")
# name=value pairs in text and in query strings; the value ends at a separator or quote
# a malformed authority (``scheme://user:pa/ss@host``): anything from ``user:`` to an ``@``
_LOOSE_USERINFO_RE = re.compile(rf"(?P<scheme>{_SCHEME})[^\s@/?#]*:[^\s@]*@")
_PAIR_RE = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<sep>=|%3[Dd])(?P<value>[^\s&;,'\"()<>\[\]{}]+)")
_BEARER_RE = re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=\-]{8,}")
_MIN_ENV_SECRET = 4
_HYDRA_ESCAPE_RE = re.compile(r"\\(.)")


def is_secret_name(name: str) -> bool:
    """True when ``name`` (a query parameter, a config key, an environment variable) names a secret.

    Args:
        name: e.g. ``access_token``, ``db.password``, ``X-Amz-Signature``, ``MLFLOW_TRACKING_TOKEN``.
    """
    words = [w.lower() for w in _WORD_RE.findall(name)]
    if not words:
        return False
    return words[-1] in _LAST_WORDS or any(w in _STRONG_WORDS or w.endswith(_SECRET_SUFFIXES) for w in words)


def redact_uri(uri: str | None) -> str:
    """``uri`` without userinfo and with secret-looking query values replaced by ``***``.

    Args:
        uri: a tracking URI (``http://user:pw@host:5000/?token=x``), a path, or None.

    Returns:
        ``""`` for None or ``""``; ``http://host:5000/?token=***`` for the example. Strings that are
        not URIs (plain paths) come back unchanged, except for anything :func:`redact_text` hides.
    """
    if not uri:
        return ""
    uri = str(uri)
    out = _strip_userinfo(uri)
    if "?" in out:
        base, _, rest = out.partition("?")
        query, hash_, fragment = rest.partition("#")
        out = f"{base}?{_redact_query(query)}{hash_}{fragment}"
    return _redact_env_values(out)


def _strip_userinfo(text: str) -> str:
    return _LOOSE_USERINFO_RE.sub(r"\g<scheme>", _USERINFO_RE.sub(r"\g<scheme>", text))


def _redact_query(query: str) -> str:
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        name, sep, _value = parts[i].partition("=")
        if sep and is_secret_name(_unquote(name)):
            parts[i] = f"{name}={MASK}"
    return "".join(parts)


def _unquote(text: str) -> str:
    from urllib.parse import unquote_plus

    return unquote_plus(text)


def redact_text(text: str) -> str:
    """Hide credentials in free text (an error message, a param value, a log line).

    Removes the userinfo of every URI, masks the value of every ``name=value``
    pair whose name looks secret (query parameters included), ``Bearer <token>``, and the value of
    every secret-looking environment variable that is set (at least 4 characters long).

    Args:
        text: any text.

    Returns:
        The text with each secret replaced by ``***`` (userinfo is dropped with its ``@``).
    """
    if not text:
        return text
    text = _strip_userinfo(str(text))
    text = _PAIR_RE.sub(_mask_pair, text)
    text = _BEARER_RE.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return _redact_env_values(text)


def _mask_pair(m: re.Match[str]) -> str:
    name = m.group("name")
    if not is_secret_name(name):
        return m.group(0)
    if m.group("value") == MASK:
        return m.group(0)
    return f"{name}{m.group('sep')}{MASK}"


def _redact_env_values(text: str) -> str:
    for name, value in os.environ.items():
        if len(value) >= _MIN_ENV_SECRET and is_secret_name(name) and value in text:
            text = text.replace(value, MASK)
    return text


def redact_override(override: str) -> str:
    """A Hydra override string with its credentials hidden.

    Args:
        override: ``key=value`` (``+key``, ``++key``, ``~key`` and ``group@pkg`` forms too).

    Returns:
        ``key=***`` when the key names a secret (``db.password=hunter2``), else ``key=`` and the
        value through :func:`redact_text` (``mlflow.tracking_uri=http://u:p@h`` ->
        ``mlflow.tracking_uri=http://h``). A bare ``~key`` comes back as it is.
    """
    override = str(override)
    key, sep, value = override.partition("=")
    if not sep:
        return redact_text(override)
    if any(is_secret_name(part) for part in key.lstrip("+~").split("@")):
        return f"{key}={MASK}"
    plain = _HYDRA_ESCAPE_RE.sub(r"\1", value)  # Hydra stores ``http\://u\:pw@h`` in hydra.overrides.task
    redacted = redact_text(plain)
    return f"{key}={value if redacted == plain else redacted}"


def redact_overrides(overrides: Iterable[str]) -> list[str]:
    """:func:`redact_override` of each item."""
    return [redact_override(o) for o in overrides]
