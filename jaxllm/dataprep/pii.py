"""PII scrubbing: e-mail addresses, phone numbers, IPv4 and IPv6 addresses, and the user's own regexes.

The e-mail and IPv4 patterns and the "public addresses only" rule are datatrove's `PIIFormatter`
(`datatrove/pipeline/formatters/pii.py`, 0.10.1: private, loopback and reserved IPs are not personal).
Differences: each kind has one fixed replacement (datatrove cycles through a list, so its output depends on
document order; ours is the same whichever worker sees a document), IPv6 and phone numbers are added, and
every replacement is counted per kind ("pii:email", "pii:phone", "pii:ipv4", "pii:ipv6", "pii:<name>").
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from jaxllm.config import ConfigError

EMAIL = (r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:(?:[A-Za-z0-9](?:["
         r"A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|\[(?:(?:25[0-5]|2[0-4][0-9]|["
         r"01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[A-Za-z0-9-]*[A-Za-z0-9]:)])")
IPV4 = r"(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
# candidates only: ipaddress decides (so "12:30:45" or a verse "3:16" is never an address)
IPV6 = r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:)?(?:%\w+)?(?![\w:])"
# +CC and separators optional; area code in parentheses or followed by a separator; 7 to 15 digits in all
PHONE = r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?|\d{2,4}[\s.-])(?:\d{2,4}[\s.-])?\d{3,4}[\s.-]\d{3,4}(?!\w|-\d)"


@dataclass
class PiiConfig:
    enabled: bool = True
    email: bool = True
    phone: bool = True
    ipv4: bool = True
    ipv6: bool = True
    only_public_ips: bool = True  # datatrove's default: private/loopback/reserved addresses stay
    email_replacement: str = "email@example.com"  # datatrove's first replacement
    phone_replacement: str = "<PHONE>"
    ipv4_replacement: str = "22.214.171.124"  # datatrove's first (did not answer pings when its list was made)
    ipv6_replacement: str = "2001:db8::1"  # the documentation prefix (RFC 3849)
    patterns: Any = field(default_factory=dict)  # {name: regex} -> "<NAME>", or {name: {regex, replacement}}


def _ip_validator(text: str, public_only: bool) -> bool:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    return not public_only or address.is_global


def _phone_validator(text: str) -> bool:
    try:  # 192.168.100.200 (or an IPv4 replacement) has a phone's shape; it is the IPv4 rule's
        ipaddress.ip_address(text)
        return False
    except ValueError:
        return 7 <= sum(c.isdigit() for c in text) <= 15


class PiiScrubber:
    """`__call__(text) -> (text, Counter of replacements per kind)`."""

    def __init__(self, config: PiiConfig):
        rules: list[tuple[str, re.Pattern, str, Optional[Callable[[str], bool]]]] = []
        ip_valid = functools.partial(_ip_validator, public_only=config.only_public_ips)
        if config.email:
            rules.append(("email", re.compile(EMAIL), config.email_replacement, None))
        if config.ipv6:  # before IPv4: an IPv4-mapped IPv6 address is one address
            rules.append(("ipv6", re.compile(IPV6), config.ipv6_replacement, ip_valid))
        if config.ipv4:
            rules.append(("ipv4", re.compile(IPV4), config.ipv4_replacement, ip_valid))
        if config.phone:
            rules.append(("phone", re.compile(PHONE), config.phone_replacement, _phone_validator))
        if not isinstance(config.patterns, dict):
            raise ConfigError(f"clean.pii.patterns must be a mapping name: regex (or name: {{regex, replacement}}), "
                              f"got {config.patterns!r}")
        for name, spec in config.patterns.items():
            regex, replacement = spec, f"<{str(name).upper()}>"
            if isinstance(spec, dict):
                unknown = set(spec) - {"regex", "replacement"}
                if unknown or "regex" not in spec:
                    raise ConfigError(f"clean.pii.patterns.{name} must have a `regex` and optionally a `replacement`, "
                                      f"got keys {sorted(spec)}")
                regex, replacement = spec["regex"], str(spec.get("replacement", replacement))
            try:
                pattern = re.compile(str(regex))
            except re.error as e:
                raise ConfigError(f"clean.pii.patterns.{name}: invalid regex {regex!r} ({e}); write a Python regex, "
                                  "e.g. '\\bACCT-\\d{6}\\b'") from None
            rules.append((str(name), pattern, replacement, None))
        self.rules = rules

    def __call__(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()
        for kind, pattern, replacement, valid in self.rules:
            def substitute(match: re.Match, kind=kind, replacement=replacement, valid=valid) -> str:
                if valid is not None and not valid(match.group(0)):
                    return match.group(0)
                counts["pii:" + kind] += 1
                return replacement
            text = pattern.sub(substitute, text)
        return text, counts
