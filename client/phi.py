"""Scan site records for likely direct identifiers (PHI) and report where, never what.

The report holds kinds, counts and row numbers only: it leaves the operator's terminal
(tickets, chat), so matched text is never stored, returned or logged.
"""

from __future__ import annotations

import bisect
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
    """One identifier in one field of one record; holds no matched text."""

    kind: PhiKind
    row: int
    field: str


@dataclass
class PhiReport:
    """Identifiers counted per kind over the scanned rows; no matched text."""

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
        """One line per kind found, naming at most `max_rows` row numbers."""
        if self.clean:
            return [f"no likely identifiers in {_plural(self.rows_scanned, 'row')} scanned"]
        lines = []
        for kind in PhiKind:
            count = self.counts.get(kind.value, 0)
            if not count:
                continue
            rows = self.rows.get(kind.value, [])
            line = f"{kind.value}: {_plural(count, 'match')} in {_plural(len(rows), 'row')}"
            if max_rows > 0 and rows:
                listed = ", ".join(str(r) for r in rows[:max_rows])
                if len(rows) > max_rows:
                    listed += f", ... and {len(rows) - max_rows} more"
                line += f" ({'row' if len(rows) == 1 else 'rows'} {listed})"
            lines.append(line)
        return lines


def _plural(n: int, noun: str) -> str:
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith("ch") else f"{n} {noun}s"


# --- patterns -------------------------------------------------------------------------
# Speed: each pattern opens with a literal or a character class, so `re` jumps to candidate
# characters instead of trying every position. Left boundaries are therefore lookbehinds
# placed after the first character: `x(?<!\w.)` means "no word character before this x".
# Rules whose pattern would still be tried at many positions also get a hint (below).
# Digits are spelled [0-9]: \d would also match other scripts' digits.


def _keywords(*words: str, ignore_case: bool = True) -> str:
    """Alternation of regex fragments that each start a word, each alternative led by a literal."""
    alts = []
    for word in words:
        firsts = dict.fromkeys((word[0].lower(), word[0].upper())) if ignore_case else word[0]
        rest = f"(?i:{word[1:]})" if ignore_case else word[1:]
        alts += [rf"{first}(?<!\w.){rest}" for first in firsts]
    return "(?:" + "|".join(alts) + ")"


_MONTHS = {
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6,
    "jul": 7, "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12,
}  # fmt: skip
_MONTH_WORDS = (
    "jan(?:uary)?", "feb(?:ruary)?", "mar(?:ch)?", "apr(?:il)?", "may", "june?", "july?",
    "aug(?:ust)?", "sep(?:t(?:ember)?)?", "oct(?:ober)?", "nov(?:ember)?", "dec(?:ember)?",
)  # fmt: skip
_MONTH = "(?i:" + "|".join(_MONTH_WORDS) + r")\b"
_ORDINAL = "(?i:st|nd|rd|th)?"
_NUMBER = r"[0-9](?<![0-9][0-9])(?<![0-9][./-][0-9])"  # first digit of a number, not of 1.2.3
_DATE_END = r"(?![0-9]|[/.-][0-9])"
# Full calendar dates; group names tell the validator which form matched.
_DMY = (  # 03/14/1962, 14.03.1962, 3-14-62: day and month in either order
    rf"(?P<na>{_NUMBER}[0-9]?)(?P<ns>[/.-])(?P<nb>[0-9]{{1,2}})(?P=ns)"
    rf"(?P<ny>[0-9]{{4}}|[0-9]{{2}}){_DATE_END}"
)
_YMD = (  # 1962-03-14, 1962/3/14
    rf"(?P<iy>{_NUMBER}[0-9]{{3}})(?P<is>[/.-])(?P<im>[0-9]{{1,2}})(?P=is)"
    rf"(?P<id>[0-9]{{1,2}}){_DATE_END}"
)
_MONTH_DAY_YEAR = (  # March 14, 1962 / Mar. 14th 2019
    rf"(?P<tm>{_keywords(*_MONTH_WORDS)})\b\.?\s+(?P<td>[0-3]?[0-9]){_ORDINAL},?\s+"
    r"(?P<ty>[0-9]{4})(?![0-9])"
)
_DAY_MONTH_YEAR = (  # 14 March 1962 / 14th of March, 1962
    rf"(?P<ud>{_NUMBER}[0-9]?){_ORDINAL}\s+(?:of\s+)?(?P<um>{_MONTH})\.?,?\s+"
    r"(?P<uy>[0-9]{4})(?![0-9])"
)
_DAY_MON_YEAR = (  # 14-Mar-1962, 14/MAR/62
    rf"(?P<vd>{_NUMBER}[0-9]?)(?P<vs>[-/])(?P<vm>{_MONTH})(?P=vs)"
    r"(?P<vy>[0-9]{4}|[0-9]{2})(?![0-9])"
)
# Month and year only: enough for a date of birth, not for a date on its own.
_MONTH_YEAR = (
    rf"(?P<pm>{_MONTH})\.?,?\s+(?P<py>[0-9]{{4}})(?![0-9])"
    rf"|(?P<qm>{_NUMBER}[0-9]?)[/.-](?P<qy>[0-9]{{4}})(?![0-9])"
)
_DOB_WORDS = (r"d\.?o\.?b\b\.?", r"date\s+of\s+birth", r"birth\s*date", "birthday", "born")
_DOB = (
    rf"{_keywords(*_DOB_WORDS)}(?:\s+(?i:on|in)\b)?\s*[:#-]?\s*(?:{_DMY}|{_YMD}"
    rf"|{_MONTH_DAY_YEAR}|{_DAY_MONTH_YEAR}|{_DAY_MON_YEAR}|{_MONTH_YEAR})"
)

_UPPER = "A-ZÀ-ÖØ-Þ"
_LOWER = "a-zß-öø-ÿ"
_NAME = rf"(?:[{_UPPER}]\.\s*)?[{_UPPER}](?:'[{_UPPER}])?[{_LOWER}]+(?:[-'][{_UPPER}]?[{_LOWER}]+)*"
_CAPS_NAME = rf"[{_UPPER}](?:'?[{_UPPER}]){{2,}}(?:-[{_UPPER}]+)*\b"
# Title-case titles take a capitalised name (Dr. Alice Moreno, Mrs O'Neil). Upper-case
# titles need the dot and an upper-case name (MR. SMITH), so that "MS Contin" and
# "moderate MR. No AS" (morphine sulfate, mitral regurgitation) are left alone.
_TITLES = ("Dr", "Mrs", "Mr", "Ms", "Miss", "Prof")
_TITLED_NAME = "|".join(
    [_keywords(t, ignore_case=False) + rf"\.?\s+{_NAME}" for t in _TITLES]
    + [_keywords(t.upper(), ignore_case=False) + rf"\.\s*{_CAPS_NAME}" for t in _TITLES]
)

_SSN = r"[0-9](?<![0-9-][0-9])[0-9]{2}-[0-9]{2}-[0-9]{4}(?![0-9]|-[0-9])"
_SSN_WORDS = ("ssn", r"social\s+security(?:\s+(?:number|no\b\.?|#))?")
_LABELLED_SSN = (
    rf"{_keywords(*_SSN_WORDS)}\b\s*[:#.]?\s*[0-9]{{3}}[\s-]?[0-9]{{2}}[\s-]?[0-9]{{4}}(?![0-9])"
)
_MRN_WORDS = (
    r"mrn\b", r"mr\s?#", r"medical\s+record(?:\s+(?:number\b|no\b\.?|#))?",
    r"record\s*(?:number\b|no\b\.?|#)", r"patient\s+(?:id\b|identifier\b|number\b|no\b\.?|#)",
    r"account\s+(?:number\b|no\b\.?|#)", r"acct\b\.?\s*(?:number\b|no\b\.?|#)?",
)  # fmt: skip
_MRN = (  # the number: 5+ digits, or 5+ letters, digits and dashes with a digit among them
    rf"{_keywords(*_MRN_WORDS)}\s*[:#.]?\s*"
    r"(?:[0-9]{5,}|(?=[A-Za-z-]*[0-9])[A-Za-z0-9][A-Za-z0-9-]{4,})\b"
)
# (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-1234: the first character is "(" or
# a digit, and lookbehinds on it pick the form that follows.
_PHONE = (
    r"[(0-9](?<![\w+.-][(0-9])"
    r"(?:(?<=1)[\s.-](?:\([0-9]{3}\)\s?|[0-9]{3}[\s.-])|(?<=\()[0-9]{3}\)\s?|(?<=[0-9])[0-9]{2}[\s.-])"
    r"[0-9]{3}[\s.-][0-9]{4}(?![0-9]|[.-][0-9])"
)
# +44 20 7946 0958, +1-555-123-4567, +33 (0)1 23 45 67 89
_INTL_PHONE = r"\+(?<![\w+]\+)[1-9][0-9]{0,2}(?:[\s.-]?\(?[0-9]{1,4}\)?){2,6}(?![0-9])"
_PHONE_WORDS = ("telephone", "phone", "tel", "cell", "mobile", "fax")
_LABELLED_PHONE = (  # phone: 5551234567
    rf"{_keywords(*_PHONE_WORDS)}\b\.?\s*"
    r"(?i:no\b\.?|#)?\s*:?\s*\+?\(?[0-9](?:[\s().-]{0,2}[0-9]){9,14}(?![0-9])"
)
_EMAIL = r"@(?<=[\w.+-]@)[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b"  # the span starts at the @
_URL_WORDS = ("https?://", r"www\.[\w-]+\.")
_URL = rf"{_keywords(*_URL_WORDS)}[^\s<>\"']+"
_IP_ADDRESS = r"[0-9](?<![0-9.][0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![0-9]|\.[0-9])"

# Hints, searched in the lower-cased text: cheap patterns without which a rule cannot
# match, found by rarer characters than the rule's own first one.
_MONTH_NAMES = "(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)"
_SEPARATED_NUMBERS = r"[/.-][0-9]{1,2}[/.-][0-9]"
_MRN_HINT = r"mrn|mr\s?#|record\s*(?:n|#)|medical\s+record|patient\s+(?:id|n|#)|acc(?:oun)?t\b"
# Worded dates and phone numbers end in a 4-digit number: anchored rules are searched only
# in a window reaching back from each such number (and a little past it, for lookaheads).
_FOUR_DIGITS = re.compile(r"[0-9](?<![0-9][0-9])[0-9]{3}(?![0-9])")
_REACH = 40
_LOOKAHEAD = 2


# --- validation -----------------------------------------------------------------------


def _valid_day_month(day: int, month: int) -> bool:
    days = 29 if month == 2 else 30 if month in (4, 6, 9, 11) else 31
    return 1 <= month <= 12 and 1 <= day <= days


def _valid_year(year: str) -> bool:
    return len(year) == 2 or 1850 <= int(year) <= 2150


def _month(name: str) -> int:
    return _MONTHS[name[:3].lower()]


def _valid_date(m: re.Match[str]) -> bool:
    """Check day, month and year of whichever date form matched (see the group names)."""
    g = m.groupdict()
    if g.get("na"):
        a, b = int(g["na"]), int(g["nb"])
        if g["ns"] == "." and len(g["ny"]) == 2:  # 1.2.10 is a version, not a date
            return False
        return _valid_year(g["ny"]) and (_valid_day_month(b, a) or _valid_day_month(a, b))
    if g.get("iy"):
        return _valid_year(g["iy"]) and _valid_day_month(int(g["id"]), int(g["im"]))
    if g.get("tm"):
        return _valid_year(g["ty"]) and _valid_day_month(int(g["td"]), _month(g["tm"]))
    if g.get("ud"):
        return _valid_year(g["uy"]) and _valid_day_month(int(g["ud"]), _month(g["um"]))
    if g.get("vd"):
        return _valid_year(g["vy"]) and _valid_day_month(int(g["vd"]), _month(g["vm"]))
    if g.get("pm"):
        return _valid_year(g["py"])
    return _valid_year(g["qy"]) and 1 <= int(g["qm"]) <= 12


def _valid_ssn(m: re.Match[str]) -> bool:
    digits = "".join(c for c in m.group() if c.isdigit())
    return digits[:3] not in ("000", "666") and digits[3:5] != "00" and digits[5:] != "0000"


def _valid_phone(m: re.Match[str]) -> bool:
    return 10 <= sum(c.isdigit() for c in m.group()) <= 15


def _valid_ip(m: re.Match[str]) -> bool:
    return all(int(part) <= 255 for part in m.group().split("."))


@dataclass(frozen=True)
class _Rule:
    kind: PhiKind
    pattern: re.Pattern[str]
    valid: Callable[[re.Match[str]], bool] | None = None
    words: tuple[str, ...] = ()
    """The lower-cased text must hold one of these for the rule to run."""
    hint: re.Pattern[str] | None = None
    """The lower-cased text must match this for the rule to run."""
    anchored: bool = False
    """Search only before 4-digit numbers (see _FOUR_DIGITS)."""


def _rule(
    kind: PhiKind,
    pattern: str,
    valid: Callable[[re.Match[str]], bool] | None = None,
    words: tuple[str, ...] = (),
    hint: str | None = None,
    anchored: bool = False,
) -> _Rule:
    compiled_hint = re.compile(hint) if hint else None
    return _Rule(kind, re.compile(pattern), valid, words, compiled_hint, anchored)


# Priority order: a match overlapping a span taken by an earlier rule is not counted, so a
# date of birth is not also a date, and an SSN is not also a phone.
_RULES = (
    _rule(PhiKind.URL, _URL, words=("://", "www.")),
    _rule(PhiKind.EMAIL, _EMAIL),
    _rule(PhiKind.DATE_OF_BIRTH, _DOB, _valid_date, words=("dob", "d.o.b", "birth", "born")),
    _rule(PhiKind.SSN, _LABELLED_SSN, _valid_ssn, words=("ssn", "social")),
    _rule(PhiKind.SSN, _SSN, _valid_ssn, hint=r"-[0-9]{2}-[0-9]{4}"),
    _rule(PhiKind.MRN, _MRN, hint=_MRN_HINT),
    _rule(PhiKind.PHONE, _LABELLED_PHONE, _valid_phone, words=_PHONE_WORDS),
    _rule(PhiKind.PHONE, _PHONE, anchored=True),
    _rule(PhiKind.PHONE, _INTL_PHONE, _valid_phone),
    _rule(PhiKind.DATE, _DMY, _valid_date, hint=_SEPARATED_NUMBERS),
    _rule(PhiKind.DATE, _YMD, _valid_date, hint=_SEPARATED_NUMBERS),
    _rule(PhiKind.DATE, _MONTH_DAY_YEAR, _valid_date, anchored=True),
    _rule(PhiKind.DATE, _DAY_MONTH_YEAR, _valid_date, anchored=True),
    _rule(PhiKind.DATE, _DAY_MON_YEAR, _valid_date, hint=rf"[-/]{_MONTH_NAMES}[a-z]*[-/]"),
    _rule(PhiKind.IP_ADDRESS, _IP_ADDRESS, _valid_ip, hint=r"\.[0-9]{1,3}\.[0-9]{1,3}\."),
    _rule(PhiKind.TITLED_NAME, _TITLED_NAME),
)


# --- scanning -------------------------------------------------------------------------


def scan_text(text: str) -> list[PhiKind]:
    """Kinds of the identifiers in `text`, one per match in text order; overlaps count once."""
    lowered = text.lower()
    hints: dict[re.Pattern[str], bool] = {}  # rules share hints: search each one once
    anchors: list[tuple[int, int]] | None = None
    taken: list[tuple[int, int, PhiKind]] = []  # sorted, non-overlapping spans
    for rule in _RULES:
        if rule.words and not any(w in lowered for w in rule.words):
            continue
        if rule.hint is not None:
            if rule.hint not in hints:
                hints[rule.hint] = rule.hint.search(lowered) is not None
            if not hints[rule.hint]:
                continue
        if rule.anchored:
            if anchors is None:
                anchors = [m.span() for m in _FOUR_DIGITS.finditer(text)]
            windows = [(max(0, s - _REACH), e + _LOOKAHEAD) for s, e in anchors]
        else:
            windows = [(0, len(text))]
        for pos, endpos in windows:
            for m in rule.pattern.finditer(text, pos, endpos):
                if rule.valid is not None and not rule.valid(m):
                    continue
                start, end = m.span()
                i = bisect.bisect_left(taken, (start, -1))
                if (i > 0 and taken[i - 1][1] > start) or (i < len(taken) and taken[i][0] < end):
                    continue
                taken.insert(i, (start, end, rule.kind))
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
    kinds = [kind.value for kind in PhiKind if kind.value in counts]
    return PhiReport(
        counts={k: counts[k] for k in kinds},
        rows={k: sorted(row_sets[k]) for k in kinds},
        rows_scanned=scanned,
    )
