"""Scan site records for likely direct identifiers (PHI) and report where, never what.

The report holds kinds, counts and row numbers only: it leaves the operator's terminal
(tickets, chat), so the matched text is never stored, returned or logged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class PhiKind(StrEnum):
    """A kind of direct identifier."""

    TITLED_NAME = "titled-name"
    DATE_OF_BIRTH = "date-of-birth"
    DATE = "date"
    PHONE = "phone"
    EMAIL = "email"
    MRN = "mrn"
    SSN = "ssn"
    IP_ADDRESS = "ip-address"
    URL = "url"


@dataclass(frozen=True)
class Finding:
    """One identifier found in one field of one record; holds no matched text."""

    kind: PhiKind
    row: int
    field: str


@dataclass
class PhiReport:
    """Counts and rows of identifiers per kind, over all scanned rows."""

    counts: dict[str, int] = field(default_factory=dict)
    """Kind -> number of matches."""
    rows: dict[str, list[int]] = field(default_factory=dict)
    """Kind -> sorted distinct row numbers, as the caller numbered them."""
    rows_scanned: int = 0

    @property
    def clean(self) -> bool:
        """True when no identifier was found."""
        return not self.counts

    def summary(self, max_rows: int = 10) -> list[str]:
        """Human-readable lines, one per kind found, listing at most `max_rows` row numbers."""
        if self.clean:
            return [f"no likely identifiers found in {_plural(self.rows_scanned, 'row')}"]
        lines = []
        for kind in PhiKind:
            count = self.counts.get(kind.value, 0)
            if not count:
                continue
            rows = self.rows.get(kind.value, [])
            line = f"{kind.value}: {_plural(count, 'match')} in {_plural(len(rows), 'row')}"
            if max_rows > 0 and rows:
                shown = ", ".join(str(r) for r in rows[:max_rows])
                more = len(rows) - max_rows
                label = "row" if len(rows) == 1 else "rows"
                line += f" ({label} {shown}, ... and {more} more)" if more > 0 else f" ({label} {shown})"
            lines.append(line)
        return lines


def _plural(n: int, noun: str) -> str:
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith("ch") else f"{n} {noun}s"


# --- patterns -------------------------------------------------------------------------
# Digits are spelled [0-9]: \d would also match other scripts' digits.

_MONTHS = {
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6,
    "jul": 7, "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12,
}  # fmt: skip
_MONTH = (
    r"(?i:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_DAY = r"[0-3]?[0-9](?i:st|nd|rd|th)?"
_YEAR4 = r"(?:1[89]|20)[0-9]{2}"
# Alternatives of a full calendar date; group names let one validator check any of them.
_DATE_SRC = (
    # 03/14/1962, 14.03.1962, 3-14-62: either order of day and month
    rf"(?<![0-9])(?<![0-9][./-])(?P<na>[0-9]{{1,2}})(?P<ns>[/.-])(?P<nb>[0-9]{{1,2}})(?P=ns)"
    rf"(?P<ny>{_YEAR4}|[0-9]{{2}})(?![0-9]|[/.-][0-9])"
    # 1962-03-14, 1962/3/14
    rf"|(?<![0-9])(?<![0-9][./-])(?P<iy>{_YEAR4})(?P<is>[/.-])(?P<im>[0-9]{{1,2}})(?P=is)"
    rf"(?P<id>[0-9]{{1,2}})(?![0-9]|[/.-][0-9])"
    # March 14, 1962 / Mar. 14th 2019
    rf"|\b(?P<tm>{_MONTH})\.?\s+(?P<td>{_DAY}),?\s+(?P<ty>{_YEAR4})(?![0-9])"
    # 14 March 1962 / 14th of March, 1962
    rf"|\b(?P<ud>{_DAY})\s+(?:of\s+)?(?P<um>{_MONTH})\.?,?\s+(?P<uy>{_YEAR4})(?![0-9])"
    # 14-Mar-1962 / 14/MAR/62
    rf"|\b(?P<vd>[0-3]?[0-9])(?P<vs>[-/])(?P<vm>{_MONTH})(?P=vs)(?P<vy>{_YEAR4}|[0-9]{{2}})"
    rf"(?![0-9])"
)
# Month and year only: enough to count as a date of birth, not as a date on its own.
_PARTIAL_DATE_SRC = (
    rf"\b(?P<pm>{_MONTH})\.?,?\s+(?P<py>{_YEAR4})(?![0-9])"
    rf"|(?<![0-9])(?<![0-9][./-])(?P<qm>[0-9]{{1,2}})[/.-](?P<qy>{_YEAR4})(?![0-9])"
)
_DATE = re.compile(_DATE_SRC)
_DOB = re.compile(
    r"(?i:\b(?:d\.?o\.?b\b\.?|date\s+of\s+birth|birth\s*date|birthday|born(?:\s+on|\s+in)?))"
    rf"\s*[:#-]?\s*(?:{_DATE_SRC}|{_PARTIAL_DATE_SRC})"
)

_UPPER = "A-ZÀ-ÖØ-Þ"
_LOWER = "a-zß-öø-ÿ"
_NAME = rf"[{_UPPER}](?:'[{_UPPER}])?[{_LOWER}]+(?:[-'][{_UPPER}]?[{_LOWER}]+)*"
_CAPS_NAME = rf"[{_UPPER}](?:'?[{_UPPER}]){{2,}}(?:-[{_UPPER}]+)*\b"
# Title-case titles take a capitalised name (Dr. Alice Moreno, Mrs O'Neil). Upper-case
# titles need the dot and an upper-case name (MR. SMITH), so that "MS Contin" and
# "moderate MR. No AS" (multiple sclerosis, mitral regurgitation) are left alone.
_TITLED_NAME = re.compile(
    rf"\b(?:(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+(?:[{_UPPER}]\.\s*)?{_NAME}"
    rf"|(?:DR|MR|MRS|MS|MISS|PROF)\.\s*{_CAPS_NAME})"
)

_SSN = re.compile(
    r"(?<![0-9-])(?P<a>[0-9]{3})-(?P<g>[0-9]{2})-(?P<s>[0-9]{4})(?![0-9]|-[0-9])"
    r"|(?i:\b(?:ssn|social\s+security(?:\s+(?:number|no\.?|#))?))\s*[:#.]?\s*"
    r"(?P<la>[0-9]{3})[\s-]?(?P<lg>[0-9]{2})[\s-]?(?P<ls>[0-9]{4})(?![0-9])"
)
_MRN = re.compile(
    r"(?i:\b(?:mrn|mr\s?#|medical\s+record(?:\s+(?:number|no\b\.?|#))?"
    r"|record\s*(?:number|no\b\.?|#)|patient\s+(?:id|identifier|number|no\b\.?|#)"
    r"|account\s+(?:number|no\b\.?|#)|acct\b\.?\s*(?:number|no\b\.?|#)?))"
    r"\s*[:#.]?\s*(?:[0-9]{5,}|(?=[A-Za-z-]*[0-9])[A-Za-z0-9][A-Za-z0-9-]{4,})\b"
)
_PHONE = re.compile(
    # (555) 123-4567, 555-123-4567, 555.123.4567, +1-555-123-4567
    r"(?<![\w+.-])(?:\+?1[\s.-]?)?(?:\([0-9]{3}\)\s?|[0-9]{3}[\s.-])[0-9]{3}[\s.-][0-9]{4}"
    r"(?![0-9]|[.-][0-9])"
    # +44 20 7946 0958, +33 (0)1 23 45 67 89
    r"|(?<![\w+])\+[1-9][0-9]{0,2}(?:[\s.-]?\(?[0-9]{1,4}\)?){2,6}(?![0-9])"
    # a labelled bare number: phone 5551234567
    r"|(?i:\b(?:phone|tel|telephone|cell|mobile|fax)\b)\.?\s*(?:no\.?|#)?\s*:?\s*"
    r"\+?[0-9][0-9\s().-]{7,}[0-9]"
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
_URL = re.compile(r"(?i:\bhttps?://[^\s<>\"']+|\bwww\.[\w-]+\.[^\s<>\"']+)")
_IP_ADDRESS = re.compile(r"(?<![0-9.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9]|\.[0-9])")


def _days_in_month(month: int) -> int:
    return 29 if month == 2 else 30 if month in (4, 6, 9, 11) else 31


def _valid_day_month(day: int, month: int) -> bool:
    return 1 <= month <= 12 and 1 <= day <= _days_in_month(month)


def _month(name: str) -> int:
    return _MONTHS[name[:3].lower()]


def _valid_date(m: re.Match[str]) -> bool:
    g = m.groupdict()
    if g["na"] is not None:
        a, b, year = int(g["na"]), int(g["nb"]), g["ny"]
        if g["ns"] == "." and len(year) == 2:  # 1.2.10 is a version, not a date
            return False
        return _valid_day_month(b, a) or _valid_day_month(a, b)
    if g["iy"] is not None:
        return _valid_day_month(int(g["id"]), int(g["im"]))
    if g["tm"] is not None:
        return _valid_day_month(int(g["td"].rstrip("stndrhSTNDRH")), _month(g["tm"]))
    if g["ud"] is not None:
        return _valid_day_month(int(g["ud"].rstrip("stndrhSTNDRH")), _month(g["um"]))
    if g["vd"] is not None:
        return _valid_day_month(int(g["vd"]), _month(g["vm"]))
    if g.get("qm") is not None:
        return 1 <= int(g["qm"]) <= 12
    return g.get("pm") is not None


def _valid_ssn(m: re.Match[str]) -> bool:
    area, group, serial = m.group("a", "g", "s")
    if area is None:
        area, group, serial = m.group("la", "lg", "ls")
    return area not in ("000", "666") and group != "00" and serial != "0000"


def _valid_phone(m: re.Match[str]) -> bool:
    return 10 <= sum(c.isdigit() for c in m.group()) <= 15


def _valid_ip(m: re.Match[str]) -> bool:
    return all(int(part) <= 255 for part in m.group().split("."))


@dataclass(frozen=True)
class _Rule:
    kind: PhiKind
    pattern: re.Pattern[str]
    valid: Callable[[re.Match[str]], bool] | None = None
    needs: tuple[str, ...] = ()
    """Substrings of which the text must hold one for the rule to match at all (a fast skip)."""


# Priority order: a match overlapping a span taken by an earlier rule is not counted, so a
# date of birth is not also a date, and an SSN is not also a phone.
_RULES = (
    _Rule(PhiKind.URL, _URL, needs=("://", "www.", "WWW.")),
    _Rule(PhiKind.EMAIL, _EMAIL, needs=("@",)),
    _Rule(PhiKind.DATE_OF_BIRTH, _DOB, _valid_date),
    _Rule(PhiKind.SSN, _SSN, _valid_ssn),
    _Rule(PhiKind.MRN, _MRN),
    _Rule(PhiKind.PHONE, _PHONE, _valid_phone),
    _Rule(PhiKind.DATE, _DATE, _valid_date),
    _Rule(PhiKind.IP_ADDRESS, _IP_ADDRESS, _valid_ip, needs=(".",)),
    _Rule(PhiKind.TITLED_NAME, _TITLED_NAME),
)


def scan_text(text: str) -> list[PhiKind]:
    """Kinds of the identifiers in `text`, one per match in text order; overlaps count once."""
    taken: list[tuple[int, int, PhiKind]] = []
    for rule in _RULES:
        if rule.needs and not any(n in text for n in rule.needs):
            continue
        for m in rule.pattern.finditer(text):
            if rule.valid is not None and not rule.valid(m):
                continue
            start, end = m.span()
            if any(start < e and s < end for s, e, _ in taken):
                continue
            taken.append((start, end, rule.kind))
    taken.sort()
    return [kind for _, _, kind in taken]


def scan_record(row: int, fields: Mapping[str, str]) -> list[Finding]:
    """Findings in the string fields of one record, numbered `row` by the caller."""
    return [Finding(kind, row, name) for name, text in fields.items() for kind in scan_text(text)]


def scan_rows(rows: Iterable[tuple[int, Mapping[str, str]]]) -> PhiReport:
    """Scan (row number, string fields) pairs and count identifiers per kind and row."""
    counts: dict[str, int] = {}
    row_sets: dict[str, set[int]] = {}
    scanned = 0
    for row, fields in rows:
        scanned += 1
        for finding in scan_record(row, fields):
            kind = finding.kind.value
            counts[kind] = counts.get(kind, 0) + 1
            row_sets.setdefault(kind, set()).add(row)
    order = {kind.value: i for i, kind in enumerate(PhiKind)}
    kinds = sorted(counts, key=order.__getitem__)
    return PhiReport(
        counts={k: counts[k] for k in kinds},
        rows={k: sorted(row_sets[k]) for k in kinds},
        rows_scanned=scanned,
    )
