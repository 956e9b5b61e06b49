"""PHI scanner: planted identifiers are found, clinical text is not, reports hold no text."""

import re

import pytest

from client.phi import Finding, PhiKind, PhiReport, scan_record, scan_rows, scan_text

PLANTED: dict[PhiKind, list[str]] = {
    PhiKind.TITLED_NAME: [
        "Dr. Alice Moreno",
        "Dr Alice Moreno",
        "Mrs O'Neil",
        "Mr. Smith-Jones",
        "Ms. Gupta",
        "Miss Okafor",
        "Prof. Émile Durand",
        "Dr. A. Moreno",
        "MR. SMITH",
    ],
    PhiKind.DATE_OF_BIRTH: [
        "DOB: 03/14/1962",
        "DOB 3/14/62",
        "D.O.B. 14.03.1962",
        "dob 1962-03-14",
        "Date of birth: March 14, 1962",
        "born on 14 March 1962",
        "born in March 1962",
        "Birthdate: 14-MAR-1962",
        "DOB 03/1962",
    ],
    PhiKind.DATE: [
        "03/14/1962",
        "3/14/62",
        "14.03.1962",
        "1962-03-14",
        "2019/3/4",
        "March 14, 1962",
        "14 March 1962",
        "14th of March, 1962",
        "Mar 14 2019",
        "Mar. 14th, 2019",
        "SEPTEMBER 30 2020",
        "14-Mar-62",
    ],
    PhiKind.PHONE: [
        "(555) 123-4567",
        "555-123-4567",
        "555.123.4567",
        "555 123 4567",
        "1-800-555-1234",
        "+1-555-123-4567",
        "+44 20 7946 0958",
        "+33 1 23 45 67 89",
        "phone: 5551234567",
        "Tel. (555)123-4567",
    ],
    PhiKind.EMAIL: ["alice.moreno@example.org", "j_doe+clinic@mail.hospital.co.uk"],
    PhiKind.MRN: [
        "MRN 1234567",
        "MRN: AB12345",
        "medical record number: A1234567",
        "Medical Record # 445566",
        "record no. 00012345",
        "patient ID 12345",
        "Patient #: 8675309",
        "account number 987654321",
        "Acct# 12345678",
        "MR# 7654321",
    ],
    PhiKind.SSN: [
        "123-45-6789",
        "SSN 123456789",
        "SSN: 123-45-6789",
        "social security number 123 45 6789",
    ],
    PhiKind.IP_ADDRESS: ["192.168.1.20", "10.0.0.254"],
    PhiKind.URL: ["https://portal.example.org/patient/12345", "www.example.com/jdoe"],
}

PLANTED_CASES = [(kind, text) for kind, texts in PLANTED.items() for text in texts]

# Clinical text that de-identified notes keep; none of it is an identifier.
CLINICAL = [
    "creatinine 1.9",
    "Na 138, K 4.1",
    "BP 142/88",
    "blood pressure 142/88",
    "HR 96",
    "SpO2 94%",
    "INR 2.3",
    "glucose 245 mg/dL",
    "metoprolol 25 mg twice daily",
    "insulin glargine 20 units",
    "length of stay 5 days",
    "follow-up in 7-10 days",
    "hospital day 3",
    "72-year-old",
    "age 65-74",
    "1/2 tablet",
    "3/4 of meals",
    "2/6 systolic murmur",
    "I50.9",
    "J44.1",
    "in 2019",
    "born in 2019",
    "May 2019",
    "EF 25-30%",
    "Hgb 10.2 -> 9.8 -> 9.1",
    "WBC 12.3/uL, platelets 250 K/uL",
    "temperature 37.8 C, RR 22",
    "2+ pitting edema",
    "MS Contin 15 mg every 12 hours",
    "moderate MR. No AS.",
    "history of MS. Stable on therapy.",
    "MRI brain 1/12 negative",
    "dobutamine 5 mcg/kg/min",
    "mRNA-1273 vaccine series",
    "the patient identified 3 triggers",
    "cell count 12,000",
    "HbA1c 8.4% (goal < 7%)",
    "NYHA class III, EF 35%, QTc 480 ms",
    "13/14/1962",
    "02/30/2019",
    "version 1.2.10",
    "ratio 1:2:3",
    "Dr. visit scheduled",
]


def _fields(text: str) -> dict[str, str]:
    return {"text": text}


@pytest.mark.parametrize(("kind", "text"), PLANTED_CASES)
def test_planted_identifier_is_found_with_its_kind(kind: PhiKind, text: str) -> None:
    assert scan_text(f"Pt seen today. {text} ; reviewed with team.") == [kind]


@pytest.mark.parametrize("text", CLINICAL)
def test_clinical_text_is_not_flagged(text: str) -> None:
    assert scan_text(text) == []


def test_a_whole_deidentified_note_is_clean() -> None:
    note = ". ".join(CLINICAL)
    report = scan_rows([(1, {"text": note, "label": "1"})])
    assert report.clean
    assert report.counts == {} and report.rows == {}
    assert report.summary() == ["no likely identifiers in 1 row scanned"]


def test_date_of_birth_is_not_also_a_date() -> None:
    assert scan_text("DOB: 03/14/1962") == [PhiKind.DATE_OF_BIRTH]
    text = "DOB 14 March 1962, admitted 2019-03-14, born on Mar 3, 1950"
    assert scan_text(text) == [PhiKind.DATE_OF_BIRTH, PhiKind.DATE, PhiKind.DATE_OF_BIRTH]


def test_ssn_is_not_also_a_phone_and_labels_do_not_double_count() -> None:
    assert scan_text("SSN: 123-45-6789") == [PhiKind.SSN]
    assert scan_text("SSN 123456789") == [PhiKind.SSN]
    assert scan_text("Phone: (555) 123-4567") == [PhiKind.PHONE]
    text = "call 555-123-4567 or 555.987.6543; SSN 123-45-6789"
    assert scan_text(text) == [PhiKind.PHONE, PhiKind.PHONE, PhiKind.SSN]


def test_impossible_numbers_are_not_identifiers() -> None:
    assert scan_text("000-12-3456 and 123-00-4567") == []  # not valid SSNs
    assert scan_text("300.168.1.1") == []  # octet over 255


def test_several_matches_in_one_text_count_separately_in_order() -> None:
    text = "Dr. Alice Moreno called 555-123-4567 about MRN 1234567 on 03/14/2019."
    assert scan_text(text) == [PhiKind.TITLED_NAME, PhiKind.PHONE, PhiKind.MRN, PhiKind.DATE]


def test_scan_record_names_row_and_field() -> None:
    fields = {"messages[0].content": "BP 142/88", "messages[2].content": "mail a.b@example.org"}
    assert scan_record(17, fields) == [Finding(PhiKind.EMAIL, 17, "messages[2].content")]


def test_scan_rows_counts_matches_and_distinct_rows() -> None:
    rows = [
        (4, {"text": "DOB: 03/14/1962", "completion": "DOB 14 March 1962"}),
        (2, {"text": "creatinine 1.9"}),
        (17, {"prompt": "born on 1/2/1950", "completion": "call (555) 123-4567"}),
        (9, {"text": "3/4 of meals"}),
    ]
    report = scan_rows(rows)
    assert report.rows_scanned == 4
    assert report.counts == {"date-of-birth": 3, "phone": 1}
    assert report.rows == {"date-of-birth": [4, 17], "phone": [17]}
    assert not report.clean
    assert report.summary() == [
        "date-of-birth: 3 matches in 2 rows (rows 4, 17)",
        "phone: 1 match in 1 row (row 17)",
    ]


def test_summary_truncates_long_row_lists() -> None:
    report = PhiReport(counts={"phone": 120}, rows={"phone": list(range(2, 120))}, rows_scanned=500)
    (line,) = report.summary()
    rows = "rows 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ... and 108 more"
    assert line == f"phone: 120 matches in 118 rows ({rows})"
    assert report.summary(max_rows=0) == ["phone: 120 matches in 118 rows"]


def test_report_never_holds_the_matched_text() -> None:
    texts = [text for _, text in PLANTED_CASES]
    rows = [(row, {"text": f"Note. {text} reviewed."}) for row, text in enumerate(texts, 1)]
    report = scan_rows(rows)
    assert sum(report.counts.values()) == len(PLANTED_CASES)
    findings = [f for row, fields in rows for f in scan_record(row, fields)]
    outputs = [*report.summary(), *report.summary(max_rows=1000), repr(report), repr(findings)]
    kind_words = {word for kind in PhiKind for word in kind.value.split("-")}
    for text in texts:
        words = [w for w in re.split(r"\W+", text) if len(w) >= 4 and w.lower() not in kind_words]
        for output in outputs:
            assert text not in output
            for word in words:
                assert not re.search(rf"\b{re.escape(word)}\b", output), f"{word!r} leaked"


def test_large_scan_counts_correctly() -> None:
    note = (
        "72-year-old with HFrEF (EF 25%), BP 142/88, HR 96, Na 138, K 4.1, creatinine 1.9, "
        "INR 2.3; metoprolol 25 mg twice daily; follow-up in 7-10 days; I50.9, J44.1. "
    ) * 4
    rows = []
    for row in range(1, 20_001):
        text = note
        if row % 7 == 0:
            text += f"Call 555-{row % 1000:03d}-{row % 10000:04d}. "
        if row % 11 == 0:
            text += "DOB: 03/14/1962. "
        rows.append((row, {"text": text}))
    report = scan_rows(rows)
    sevens = [r for r in range(1, 20_001) if r % 7 == 0]
    elevens = [r for r in range(1, 20_001) if r % 11 == 0]
    assert report.rows_scanned == 20_000
    assert report.counts == {"date-of-birth": len(elevens), "phone": len(sevens)}
    assert report.rows == {"date-of-birth": elevens, "phone": sevens}
