"""PII masking: every format replaced and counted; look-alikes and existing placeholders left alone."""

import pytest

from lmforge.data.pii import EMAIL, IP, PHONE, MaskPII, mask_pii
from lmforge.data.sources import Document


@pytest.mark.parametrize("text", [
    "john.doe@example.com", "a.b-c+tag@mail.example.co.uk", "X_Y%z@sub.domain.org",
])
def test_emails(text):
    assert mask_pii(f"write to {text}, please") == (f"write to {EMAIL}, please",
                                                   {"email": 1, "phone": 0, "ip": 0})


@pytest.mark.parametrize("text", [
    "(555) 123-4567", "555-123-4567", "555.123.4567", "555 123 4567", "+1 555 123 4567", "1-555-123-4567",
    "5551234567", "+44 20 7946 0958", "+49 30 1234567", "+33 1 23 45 67 89", "+81-3-1234-5678",
])
def test_phones(text):
    assert mask_pii(f"call {text} now") == (f"call {PHONE} now", {"email": 0, "phone": 1, "ip": 0})


@pytest.mark.parametrize("text", [
    "192.0.2.1", "198.51.100.7", "203.0.113.255", "10.0.0.1", "8.8.8.8", "255.255.255.255",
    "2001:db8::1", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::1", "fe80::1ff:fe23:4567:890a",
    "::ffff:192.0.2.128", "2001:db8:0:0:1::1",
])
def test_ip_addresses_including_documentation_ranges(text):
    assert mask_pii(f"host {text}.") == (f"host {IP}.", {"email": 0, "phone": 0, "ip": 1})


@pytest.mark.parametrize("text", [
    "version 1.2.3.4.5", "10.0.0.256", "at 12:30:45", "std::vector<int>", "in 2024-01-15", "pages 100-200",
    "ISBN 978-3-16-148410-0", "the year 1999", "call +12", "value 3.14159",
])
def test_look_alikes_are_left_alone(text):
    assert mask_pii(text) == (text, {"email": 0, "phone": 0, "ip": 0})


def test_existing_placeholders_left_and_not_counted():
    text = f"already {EMAIL} and {PHONE} and {IP}; new bob@example.org and 192.0.2.9"
    out, counts = mask_pii(text)
    assert out == f"already {EMAIL} and {PHONE} and {IP}; new {EMAIL} and {IP}"
    assert counts == {"email": 1, "phone": 0, "ip": 1}
    assert mask_pii(out) == (out, {"email": 0, "phone": 0, "ip": 0})  # idempotent


def test_step_counts_and_switches():
    step = MaskPII()
    docs = [Document("mail a@b.co or c@d.org, ip 192.0.2.1", "1"), Document("tel 555-123-4567", "2")]
    out = list(step.run(iter(docs)))
    assert [d.text for d in out] == [f"mail {EMAIL} or {EMAIL}, ip {IP}", f"tel {PHONE}"]
    assert step.stats.counters == {"email": 2, "ip": 1, "phone": 1}
    only_email = MaskPII(MaskPII.Config(phone=False, ip=False))
    assert only_email.process(Document("a@b.co 192.0.2.1", "x")).text == f"{EMAIL} 192.0.2.1"
