"""PII scrubbing: e-mail addresses, phone numbers, IP addresses and card numbers become typed placeholders.

Each kind is found by a regular expression, then checked where a regex alone is too loose (IPv6
syntax, the Luhn checksum of card numbers, the digit count of phone numbers). The patterns avoid
plain numbers, years, dates and version strings such as 3.11.7, at the price of missing phone
numbers written without separators.
"""

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

PLACEHOLDERS = {"EMAIL": "<EMAIL>", "PHONE": "<PHONE>", "IP": "<IP>", "CREDIT_CARD": "<CREDIT_CARD>"}

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_BODY = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_NUMBER_END = r"(?!\w|[.,-][0-9])"  # not followed by more of the same number

EMAIL = re.compile(
    r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-]|\.\w)"
)
IPV4 = re.compile(rf"(?<![\w.]){_IPV4_BODY}(?!\w|\.[0-9])")
IPV6 = re.compile(  # a candidate with 2+ colons; `_is_ipv6` decides
    rf"(?<![\w:.])(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{{2,39}}(?:(?<=:){_IPV4_BODY})?(?![\w:]|\.[0-9])"
)
CARD = re.compile(  # 13-19 digits, bare or in groups of 3-6 after a first group of 4; `_is_card` decides
    rf"(?<![\w.,+-])(?:[0-9]{{13,19}}|[0-9]{{4}}([ -])[0-9]{{3,6}}(?:\1[0-9]{{3,6}}){{1,3}}){_NUMBER_END}"
)
PHONE_INTL = re.compile(r"(?<![\w+])\+[1-9][0-9]{0,2}(?:[ -]?(?:\([0-9]{1,4}\)|[0-9]{1,4}+)){2,6}" + _NUMBER_END)
PHONE_NATIONAL = re.compile(
    r"(?<![\w.+-])(?<![0-9][ .-])(?:"
    r"\([0-9]{2,5}\) ?[0-9]{3,4}[ .-]?[0-9]{3,4}"  # (555) 123-4567, (020) 7946 0958
    r"|(?:1[.-])?[0-9]{3}([.-])[0-9]{3}\1[0-9]{4}"  # 555-123-4567, 1-800-555-0199, 555.123.4567
    r"|0[0-9]{1,4}([ -])[0-9]{2,8}(?:\2[0-9]{2,4}){0,3}"  # trunk prefix 0: 020 7946 0958, 06-12345678
    r")(?!\w|[ .-][0-9])"
)
_DIGIT = re.compile(r"[0-9]")


def luhn_valid(digits: str) -> bool:
    """True if `digits` (ASCII digits only, nothing else) passes the Luhn checksum."""
    if not digits or not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _digit_count(text: str) -> int:
    return len(_DIGIT.findall(text))


def _is_ipv6(text: str) -> bool:
    """A valid IPv6 address with 3+ non-empty groups (so `::`, `::1` and slices like `1::2` stay)."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return sum(1 for g in text.split(":") if g) + ("." in text) >= 3


def _is_card(text: str) -> bool:
    digits = _DIGIT.findall(text)
    return 13 <= len(digits) <= 19 and luhn_valid("".join(digits))


class Rule(NamedTuple):
    """One kind of PII: its regex, an optional check of the matched text, and a cheap pre-check."""

    kind: str
    pattern: re.Pattern
    valid: Callable[[str], bool] | None = None
    marker: str = ""  # a character every match holds, so texts without it skip the regex; "" = a digit


RULES = (
    Rule("EMAIL", EMAIL, marker="@"),
    Rule("IP", IPV6, _is_ipv6, marker=":"),
    Rule("IP", IPV4),
    Rule("CREDIT_CARD", CARD, _is_card),
    Rule("PHONE", PHONE_INTL, lambda s: 8 <= _digit_count(s) <= 15),
    Rule("PHONE", PHONE_NATIONAL, lambda s: 9 <= _digit_count(s) <= 12),
)


def _apply(rule: Rule, text: str, counts: Counter) -> str:
    """`text` with every valid match of `rule` replaced by its placeholder, counted in `counts`."""

    def replace(m: re.Match) -> str:
        if rule.valid is not None and not rule.valid(m.group()):
            return m.group()
        counts[rule.kind] += 1
        return PLACEHOLDERS[rule.kind]

    return rule.pattern.sub(replace, text)


def _scrub_once(text: str, counts: Counter) -> str:
    """One pass of every rule over `text`, in order, adding replacements to `counts`."""
    has_digit = _DIGIT.search(text) is not None
    for rule in RULES:
        if (rule.marker in text) if rule.marker else has_digit:
            text = _apply(rule, text, counts)
    return text


def scrub_pii(text: str) -> tuple[str, Counter]:
    """`text` with PII replaced by `<EMAIL>`, `<PHONE>`, `<IP>`, `<CREDIT_CARD>`, and the count per kind.

    Passes repeat until nothing changes, so scrubbing is idempotent even where a replacement exposes
    a new match. This terminates: every replacement removes a digit, "@" or ":" and adds none.
    """
    counts: Counter = Counter()
    while True:
        before = sum(counts.values())
        text = _scrub_once(text, counts)
        if sum(counts.values()) == before:
            return text, counts
