"""PII masking: email addresses, phone numbers, IPv4 and IPv6 addresses → fixed placeholders.

Each match is replaced by a placeholder (Dolma/CS336 style) and counted per kind:

    |||EMAIL_ADDRESS|||   |||PHONE_NUMBER|||   |||IP_ADDRESS|||

Placeholders already in the text contain no '@', digit or colon, so they are never matched again
and never counted. All IP addresses are masked, including private and documentation ranges
(192.0.2.0/24, 2001:db8::/32): which address is "real" cannot be told from text. IPv6 candidates are
validated with `ipaddress`, so clock times (12:30:45) and C++ scopes (std::vector) stay. Phones:
North American numbers (555-123-4567, (555) 123-4567, 555.123.4567, +1 555 123 4567) and
international numbers that start with '+' and have 8-15 digits (E.164). Names and street addresses
are out of scope (they need an NER model).
"""

from __future__ import annotations

import dataclasses
import ipaddress

import regex as re

from lmforge.data.pipeline import PipelineStep, register
from lmforge.data.sources import Document

EMAIL = "|||EMAIL_ADDRESS|||"
PHONE = "|||PHONE_NUMBER|||"
IP = "|||IP_ADDRESS|||"

_EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)(?!\w)")
_IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")
_US_PHONE_RE = re.compile(r"(?<![\w+.-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w-])"
                          r"|(?<![\w+.-])\d{10}(?!\w)")
_INTL_PHONE_RE = re.compile(r"(?<![\w+])\+\d{1,3}(?:[\s.-]?\(?\d{1,5}\)?){1,6}(?![\w-])")


def _mask_ipv6(m: re.Match) -> str:
    text = m.group(0)
    if not any(c in "0123456789abcdefABCDEF" for c in text):
        return text
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return IP


def _mask_intl(m: re.Match) -> str:
    digits = sum(c.isdigit() for c in m.group(0))
    return PHONE if 8 <= digits <= 15 else m.group(0)


def mask_pii(text: str, email: bool = True, phone: bool = True, ip: bool = True
             ) -> tuple[str, dict[str, int]]:
    """Return the masked text and how many emails, phone numbers and IPs were replaced.

    Order matters: emails first (their digits are not phones), IPv6 before IPv4 (::ffff:192.0.2.1
    is one address), IPs before phones (a dotted quad is not a phone number).
    """
    counts = {"email": 0, "phone": 0, "ip": 0}
    if email:
        text, counts["email"] = _EMAIL_RE.subn(EMAIL, text)
    if ip:
        before = text.count(IP)
        text = _IPV4_RE.sub(IP, _IPV6_RE.sub(_mask_ipv6, text))
        counts["ip"] = text.count(IP) - before
    if phone:
        before = text.count(PHONE)
        text = _US_PHONE_RE.sub(PHONE, _INTL_PHONE_RE.sub(_mask_intl, text))
        counts["phone"] = text.count(PHONE) - before
    return text, counts


@register("pii")
class MaskPII(PipelineStep):
    """Mask PII in every document; counters `email`, `phone`, `ip` count replacements."""

    @dataclasses.dataclass
    class Config:
        email: bool = True
        phone: bool = True
        ip: bool = True

    def process(self, doc: Document) -> Document:
        doc.text, counts = mask_pii(doc.text, self.cfg.email, self.cfg.phone, self.cfg.ip)
        for k, v in counts.items():
            if v:
                self.stat(k, v)
        return doc
