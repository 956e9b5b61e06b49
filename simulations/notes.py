"""Discharge notes rendered from a patient in three styles, and the questions asked about them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simulations.vocabulary import COMORBIDITIES, DISPOSITIONS, NUMBER_WORDS, REASONS, pick

STYLES = ("terse", "narrative", "sectioned")
READMISSION_QUESTION = (
    "Is this patient at high risk of readmission within 30 days? Answer yes or no."
)
REASON_QUESTION = "What was the primary reason for admission?"
DISPOSITION_QUESTION = "Where was the patient discharged to?"


@dataclass(frozen=True)
class Patient:
    """The facts behind one discharge note."""

    age: int
    sex: str
    reason: str
    comorbidities: tuple[str, ...]
    creatinine: float
    hemoglobin: float
    sodium: int
    bnp_elevated: bool | None  # None: not measured
    length_of_stay: int
    disposition: str
    prior_admissions: int
    follow_up_days: int | None  # None: no follow-up arranged
    follow_up_service: str
    medications: tuple[str, ...]


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def _article(age: int) -> str:
    return "an" if str(age).startswith("8") or age in (11, 18) else "a"


def _count(n: int, rng: np.random.Generator) -> str:
    """Prior admissions as a word or a digit, so both spellings are learnt."""
    return NUMBER_WORDS[n] if n == 0 or rng.random() < 0.6 else str(n)


def _lab_parts(p: Patient, style: str, rng: np.random.Generator) -> list[str]:
    terse = style == "terse"
    keep = 0.7 if terse else 0.85
    parts: list[str] = []
    if rng.random() < keep + 0.1:
        note = ""
        if p.creatinine >= 2.0 and rng.random() < 0.65:
            note = " (AKI)" if terse else " (acute kidney injury)"
        parts.append(f"{'Cr' if terse else 'creatinine'} {p.creatinine}{note}")
    if rng.random() < keep:
        note = " (anemia)" if p.hemoglobin < 10 and rng.random() < 0.65 else ""
        parts.append(f"{'Hgb' if terse else 'hemoglobin'} {p.hemoglobin}{note}")
    if rng.random() < keep - 0.1:
        note = " (hyponatremia)" if p.sodium < 133 and rng.random() < 0.65 else ""
        parts.append(f"{'Na' if terse else 'sodium'} {p.sodium}{note}")
    if p.bnp_elevated is not None:
        parts.append("BNP elevated" if p.bnp_elevated else "BNP normal")
    return parts


def _follow_up(p: Patient, style: str, rng: np.random.Generator) -> str:
    if p.follow_up_days is None:
        if style == "terse":
            return pick(rng, ("No f/u arranged.", "No follow-up arranged."))
        if style == "sectioned":
            return pick(rng, ("Follow-up: no follow-up arranged", "Follow-up: none arranged"))
        return pick(rng, ("No follow-up arranged.", "No follow-up appointment was arranged."))
    days, service = p.follow_up_days, p.follow_up_service
    if style == "terse":
        return f"F/u {service} {days}d."
    if style == "sectioned":
        return f"Follow-up: {service} in {days} days"
    return f"Follow-up with {service} in {days} days."


def _prior(p: Patient, style: str, pronoun: str, rng: np.random.Generator) -> str:
    n = p.prior_admissions
    count = _count(n, rng)
    plural = "" if n == 1 else "s"
    if style == "terse":
        return f"{count.capitalize()} admit{plural} past yr." if n else "No admits past yr."
    if style == "sectioned":
        return f"Prior admissions in past year: {count if n else 'none'}"
    if n == 0:
        return pick(rng, ("No prior admissions in the past year.", "First admission this year."))
    return pick(
        rng,
        (
            f"{pronoun} has had {count} prior admission{plural} in the past year.",
            f"{count.capitalize()} prior admission{plural} in the past 12 months.",
        ),
    )


def _vitals(rng: np.random.Generator, terse: bool) -> str:
    systolic, rate = int(rng.integers(104, 156)), int(rng.integers(58, 102))
    if terse:
        return f"Afebrile, SBP {systolic}, HR {rate}."
    return f"afebrile, systolic BP {systolic}, heart rate {rate}"


def _terse_note(p: Patient, rng: np.random.Generator) -> str:
    reason = REASONS[p.reason]
    pmh = ", ".join(COMORBIDITIES[c].terse for c in p.comorbidities) or "none"
    parts = [
        f"{p.age}{p.sex} adm for {pick(rng, reason.terse)}.",
        f"PMH: {pmh}.",
        _prior(p, "terse", "", rng),
        f"LOS {p.length_of_stay}d.",
    ]
    labs = _lab_parts(p, "terse", rng)
    if labs:
        parts.append(", ".join(labs) + ".")
    if rng.random() < 0.15:
        parts.append(_vitals(rng, terse=True))
    parts.append(f"Dispo: {DISPOSITIONS[p.disposition][2]}.")
    parts.append(_follow_up(p, "terse", rng))
    if p.medications and rng.random() < 0.5:
        parts.append(f"Meds: {p.medications[0]}.")
    return " ".join(parts)


def _narrative_note(p: Patient, rng: np.random.Generator) -> str:
    reason = REASONS[p.reason]
    female = p.sex == "F"
    person = pick(rng, ("woman", "woman", "female") if female else ("man", "man", "male"))
    pronoun = "She" if female else "He"
    history = _join([pick(rng, COMORBIDITIES[c].narrative) for c in p.comorbidities])
    history = f"a history of {history}" if history else "no significant past medical history"
    who = f"{p.age}-year-old {person} with {history}"
    admitted = pick(rng, reason.narrative)
    opener = pick(
        rng,
        (
            f"{_article(p.age).capitalize()} {who} was admitted for {admitted}.",
            f"The patient is {_article(p.age)} {who} who was admitted for {admitted}.",
        ),
    )
    course = f"{pronoun} {pick(rng, reason.course)}"
    if p.disposition == "ama":
        course += f" and left against medical advice on hospital day {p.length_of_stay}."
    else:
        course += f"; {pronoun.lower()} was {DISPOSITIONS[p.disposition][1]}"
        course += f" on hospital day {p.length_of_stay}."
    sentences = [opener, _prior(p, "narrative", pronoun, rng), course]
    labs = _lab_parts(p, "narrative", rng)
    if labs:
        sentences.append(f"Labs were notable for {_join(labs)}.")
    sentences.append(_follow_up(p, "narrative", rng))
    if rng.random() < 0.3:
        sentences.append(f"At discharge {pronoun.lower()} was {_vitals(rng, terse=False)}.")
    if rng.random() < 0.3:
        walker = rng.random() < (p.age - 30) / 80
        sentences.append(f"Ambulating {'with a walker' if walker else 'independently'}.")
    if p.medications:
        sentences.append(f"Discharge medications: {_join(list(p.medications[:2]))}.")
    return " ".join(sentences)


def _sectioned_note(p: Patient, rng: np.random.Generator) -> str:
    reason = REASONS[p.reason]
    sex = "female" if p.sex == "F" else "male"
    history = "; ".join(pick(rng, COMORBIDITIES[c].narrative) for c in p.comorbidities)
    admitted = pick(rng, reason.narrative).removeprefix("a ").removeprefix("an ")
    course = pick(rng, reason.course).removeprefix("was ")
    stay = f"{p.length_of_stay} day{'' if p.length_of_stay == 1 else 's'}"
    lines = [
        f"Reason for admission: {admitted}",
        f"Patient: {p.age}-year-old {sex}",
        f"History: {history or 'none'}",
        _prior(p, "sectioned", "", rng),
        f"Hospital course: {course}; length of stay {stay}"
        if rng.random() < 0.6
        else f"Length of stay: {stay}",
        f"Disposition: {DISPOSITIONS[p.disposition][0]}",
        _follow_up(p, "sectioned", rng),
    ]
    labs = _lab_parts(p, "sectioned", rng)
    if labs:
        lines.append(f"Labs: {'; '.join(labs)}")
    if rng.random() < 0.15:
        lines.append(f"Vitals: {_vitals(rng, terse=False)}")
    if p.medications:
        lines.append("Discharge medications:")
        lines.extend(f"- {med}" for med in p.medications[:2])
    return "\n".join(lines)


def render_note(patient: Patient, style: str, rng: np.random.Generator) -> str:
    """Write one de-identified discharge note in the given style."""
    if style == "terse":
        return _terse_note(patient, rng)
    if style == "narrative":
        return _narrative_note(patient, rng)
    if style == "sectioned":
        return _sectioned_note(patient, rng)
    raise ValueError(f"unknown note style {style!r}; expected one of {', '.join(STYLES)}")


def instruct_record(
    note: str, patient: Patient, label: int, rng: np.random.Generator
) -> dict[str, str]:
    """A prompt/completion pair about the note; the completion starts with a space."""
    roll = rng.random()
    if roll < 0.5:
        question, answer = READMISSION_QUESTION, "yes" if label else "no"
    elif roll < 0.8:
        question, answer = REASON_QUESTION, REASONS[patient.reason].canonical
    else:
        question, answer = DISPOSITION_QUESTION, DISPOSITIONS[patient.disposition][0]
    return {"prompt": f"{note}\n\nQuestion: {question}\nAnswer:", "completion": f" {answer}"}
