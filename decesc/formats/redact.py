"""Credentials out of every text decesc shows or writes: a judge's errors, warnings and repr,
the command line in a run directory's lock file, the settings in its ``config.json``.

A server's error body is worth quoting (it says what went wrong), but it may echo the request
headers, so every text a judge shows goes through `redact` first.  What is replaced by ``***``:

- the given secrets verbatim (the API key, a URL password), wherever they appear;
- URL user info: ``http://user:pass@host`` -> ``http://***@host``;
- an authorization scheme's credentials: ``Bearer abc`` / ``Basic dXNlcjpw`` -> ``Bearer ***``;
- the value after a credential word and ``:`` or ``=``: ``api_key=abc``, ``"token": "abc"``,
  ``Authorization: xyz``, ``password=hunter2`` -> ``api_key=***`` ...;
- key-like strings: ``sk-...`` / ``pk-...`` / ``rk-...`` (8+ characters after the dash),
  ``hf_...`` tokens, and any run of 32+ letters/digits (hex or base64-like) that mixes both.

`split_userinfo` takes user info out of a base URL (urllib cannot send it) so the judge can send
it as a Basic ``Authorization`` header instead.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Iterable

MASK = "***"
MIN_SECRET = 4  # shorter verbatim secrets are not replaced (they would mangle ordinary words)

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]+@")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]+")
_CREDENTIAL_WORD = (r"api[-_ ]?key|apikey|x-api-key|access[-_ ]?token|auth[-_ ]?token|"
                    r"refresh[-_ ]?token|token|client[-_ ]?secret|secret|password|passwd|pwd|"
                    r"authorization|key")
_KEY_VALUE = re.compile(r"(?i)\b(" + _CREDENTIAL_WORD + r")(\\?[\"']?\s*[:=]\s*\\?[\"']?)"
                        r"(?!(?:(?:bearer|basic|token)\s+)?\*\*\*)"   # already masked
                        r"((?:bearer|basic|token)\s+)?[^\s\"'\\,;&)}\]]+")
_KEY_LIKE = re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{8,}|\bhf_[A-Za-z0-9]{16,}")
_LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9_+=-])(?=[A-Za-z0-9_+-]*\d)(?=[A-Za-z0-9_+-]*[A-Za-z])"
                         r"[A-Za-z0-9_+-]{32,}=*")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every credential it shows replaced by ``***`` (see the module docstring).

    >>> redact("HTTP 401: bad header Authorization: Bearer sk-abcdef123456 from http://u:p@h/v1")
    'HTTP 401: bad header Authorization: Bearer *** from http://***@h/v1'
    """
    text = str(text)
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _KEY_VALUE.sub(lambda m: m.group(1) + m.group(2) + (m.group(3) or "") + MASK, text)
    text = _AUTH_SCHEME.sub(lambda m: m.group(1) + " " + MASK, text)
    text = _KEY_LIKE.sub(MASK, text)
    return _LONG_TOKEN.sub(MASK, text)


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without user info, user, password): ``http://u:p@h:1/v1`` -> (``http://h:1/v1``, u, p).

    User and password are percent-decoded; both are None when the URL has no user info.
    """
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    stripped = urllib.parse.urlunsplit(parts._replace(netloc=hostport))
    return stripped, urllib.parse.unquote(user), urllib.parse.unquote(password) or None
