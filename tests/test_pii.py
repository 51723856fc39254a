"""Tests for lmjax.corpus.pii: each PII kind, its look-alikes that must survive, and idempotence."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmjax.corpus.pii import PLACEHOLDERS, luhn_valid, scrub_pii

KEPT = [
    "Python 3.11.7 was released in 1999 or 2023.",
    "Dates: 2024-01-15, 15.01.2024, 01/15/2024, 01-02-2024 at 12:30:45.",
    "Version 1.2.3.4.5, IP-like 256.1.1.1 and 192.168.01.1, short numbers 12345 and 555-1234.",
    "Totals 1,234,567,890,123,456 and -1234567890123 and 0.12345678901234567.",
    "Slices x[::2], a[1::2], the loopback ::1, MAC 00:1a:2b:3c:4d:5e.",
    "Hex bytes 00 11 22 33 44 55 66 and ISBN 978-3-16-148410-0.",
    "Decimal('+35236450.6') and the format '+000000120'.",
    "Write to user@localhost or @decorator, not an address.",
    "A Luhn-invalid card 4111 1111 1111 1112 and a plain 10-digit id 5551234567.",
]


@pytest.mark.parametrize("text", KEPT)
def test_look_alikes_are_kept(text):
    assert scrub_pii(text) == (text, Counter())


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Mail john.doe+news@example.co.uk today.", "Mail <EMAIL> today."),
        ("<a@b.io>, X_Y-9@sub.domain.org", "<<EMAIL>>, <EMAIL>"),
        ("Unicode local part: josé@example.com.", "Unicode local part: <EMAIL>."),
    ],
)
def test_email(text, expected):
    out, counts = scrub_pii(text)
    assert out == expected
    assert set(counts) == {"EMAIL"}


@pytest.mark.parametrize(
    "phone",
    [
        "+1 (555) 123-4567",
        "+44 20 7946 0958",
        "+49-30-12345678",
        "+33 1 23 45 67 89",
        "+15551234567",
        "555-123-4567",
        "555.123.4567",
        "(555) 123-4567",
        "1-800-555-0199",
        "020 7946 0958",
        "06-12345678",
    ],
)
def test_phone(phone):
    assert scrub_pii(f"Call {phone}, please.") == ("Call <PHONE>, please.", Counter(PHONE=1))


@pytest.mark.parametrize(
    "ip",
    [
        "192.168.0.1",
        "10.0.0.255",
        "8.8.8.8",
        "2001:db8::1",
        "2001:0db8:0000:0000:0000:ff00:0042:8329",
        "::ffff:192.0.2.1",
    ],
)
def test_ip(ip):
    assert scrub_pii(f"Host {ip}.") == ("Host <IP>.", Counter(IP=1))


def test_ip_with_port_and_prefix():
    assert scrub_pii("[2001:db8::1]:8080 and 10.0.0.0/8")[0] == "[<IP>]:8080 and <IP>/8"


@pytest.mark.parametrize(
    "card", ["4111111111111111", "4111 1111 1111 1111", "4242-4242-4242-4242", "5555555555554444", "3782 822463 10005"]
)
def test_credit_card(card):
    assert scrub_pii(f"Card: {card}.") == ("Card: <CREDIT_CARD>.", Counter(CREDIT_CARD=1))


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert luhn_valid("0")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("79927398710")
    assert not luhn_valid("")
    assert not luhn_valid("4111 1111 1111 1111")
    assert not luhn_valid("١٢٣")


def test_counts_per_kind():
    text = "a@b.com, c@d.org, 192.168.0.1, +44 20 7946 0958, 4111111111111111"
    out, counts = scrub_pii(text)
    assert out == "<EMAIL>, <EMAIL>, <IP>, <PHONE>, <CREDIT_CARD>"
    assert counts == Counter(EMAIL=2, IP=1, PHONE=1, CREDIT_CARD=1)


def test_placeholders_hold_nothing_scrubbable():
    text = " ".join(PLACEHOLDERS.values())
    assert scrub_pii(text) == (text, Counter())


def test_pathological_inputs_are_fast():
    for text in ("a" * 20_000 + "@", "a@" + "b." * 10_000, "1" * 50_000, "1:" * 20_000, "+1 " * 10_000):
        scrub_pii(text)


PIECES = [
    "a@b.com", "x.y@mail.example.org", "192.168.0.1", "2001:db8::1", "::", "4111111111111111", "4111 1111",
    "+44 20 7946 0958", "555-123-4567", "(555)", "0", "1", "9", ".", "-", ":", "@", "+", " ", "\n", "<", ">", "x",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_scrub_is_idempotent_on_arbitrary_text(text):
    out, _ = scrub_pii(text)
    assert scrub_pii(out) == (out, Counter())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12))
def test_scrub_is_idempotent_on_pii_like_text(pieces):
    out, counts = scrub_pii("".join(pieces))
    assert scrub_pii(out) == (out, Counter())
    assert sum(out.count(p) for p in PLACEHOLDERS.values()) >= sum(counts.values())
