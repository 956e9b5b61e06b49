"""Synthetic federation of de-identified hospital discharge notes with a 30-day readmission label.

Every patient is drawn from a site's case mix; the label is Bernoulli(sigmoid(logit)) where the
logit is the documented linear risk model in ``RISK_MODEL`` plus the site's intercept shift. The
strongest terms are lexical (reason for admission, comorbidities, disposition, prior admissions,
missing follow-up); numeric labs and length of stay carry weaker signal. Notes carry no
identifiers: no names, calendar dates, phone numbers, record numbers or addresses, and ages are
capped at 89.

    fedtune-sim data --sites 3 --out data/synth --seed 0
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import tempfile
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

logger = logging.getLogger(__name__)

STYLES = ("terse", "narrative", "sectioned")
AGE_BANDS = ((18, 44, "18-44"), (45, 64, "45-64"), (65, 74, "65-74"), (75, 84, "75-84"))
OLDEST_AGE_BAND = "85+"
MAX_AGE = 89  # older ages are identifiers under HIPAA safe harbor; never write one
DEFAULT_MEAN_RECORDS = 575
READMISSION_QUESTION = (
    "Is this patient at high risk of readmission within 30 days? Answer yes or no."
)
REASON_QUESTION = "What was the primary reason for admission?"
DISPOSITION_QUESTION = "Where was the patient discharged to?"

# The true risk model. logit = intercept + site shift + sum of the terms below; numeric terms
# are per unit of the named quantity, hinge terms count only beyond the named threshold.
RISK_MODEL: dict[str, float] = {
    "intercept": -2.6,
    "age_per_decade_over_65": 0.12,
    "sex:M": 0.05,
    "reason:heart_failure": 0.9,
    "reason:copd_exacerbation": 0.75,
    "reason:pneumonia": 0.2,
    "reason:sepsis": 0.5,
    "reason:gi_bleed": 0.45,
    "reason:hip_fracture": 0.0,
    "reason:stroke": 0.15,
    "reason:dka": 0.7,
    "reason:cellulitis": -0.6,
    "reason:knee_replacement": -2.1,
    "reason:chest_pain": -1.2,
    "reason:hepatic_encephalopathy": 1.0,
    "reason:uti": -0.15,
    "reason:syncope": -0.75,
    "comorbidity:chf": 0.7,
    "comorbidity:copd": 0.5,
    "comorbidity:ckd": 0.6,
    "comorbidity:diabetes": 0.2,
    "comorbidity:afib": 0.2,
    "comorbidity:cirrhosis": 0.9,
    "comorbidity:dementia": 0.5,
    "comorbidity:cancer": 0.75,
    "comorbidity:depression": 0.15,
    "comorbidity:hypertension": 0.0,
    "comorbidity:hyperlipidemia": 0.0,
    "comorbidity:obesity": 0.0,
    "disposition:home": 0.0,
    "disposition:home_services": 0.45,
    "disposition:snf": 0.9,
    "disposition:rehab": 0.3,
    "disposition:ama": 1.8,
    "prior_admissions_each_up_to_4": 0.5,
    "follow_up:none": 1.0,
    "follow_up:within_7_days": -0.35,
    "length_of_stay_per_day_up_to_14": 0.04,
    "creatinine_per_mg_dl_over_1.2": 0.25,
    "hemoglobin_per_g_dl_under_11": 0.12,
    "sodium_per_mmol_under_135": 0.04,
    "bnp_elevated": 0.15,
}


@dataclass(frozen=True)
class _Reason:
    canonical: str
    narrative: tuple[str, ...]  # with article, after "admitted for"
    terse: tuple[str, ...]
    weight: float  # base share of admissions
    service: str  # follow-up clinic
    stay: float  # typical length of stay in days
    implies: str | None  # comorbidity the reason entails
    frailty: float  # multiplier on comorbidity prevalence
    course: tuple[str, ...]  # verb phrases after "She" or "He"
    meds: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class _Comorbidity:
    narrative: tuple[str, ...]
    terse: str
    prevalence: float
    age_slope: float  # log-odds-like growth per year over 65
    meds: tuple[tuple[str, ...], ...]


# fmt: off
REASONS: dict[str, _Reason] = {
    "heart_failure": _Reason(
        "heart failure exacerbation", weight=1.2, service="cardiology", stay=5,
        implies="chf", frailty=1.3,
        narrative=("a heart failure exacerbation", "acute decompensated heart failure"),
        terse=("CHF exacerbation", "CHF exac"),
        course=(
            "was diuresed with intravenous furosemide with good urine output",
            "was treated with IV diuresis and weaned off oxygen",
        ),
        meds=(("furosemide 40 mg daily", "furosemide 80 mg twice daily", "torsemide 20 mg daily"),),
    ),
    "copd_exacerbation": _Reason(
        "COPD exacerbation", weight=1.0, service="pulmonology", stay=4,
        implies="copd", frailty=1.2,
        narrative=("a COPD exacerbation", "an acute exacerbation of COPD"),
        terse=("COPD exacerbation", "COPD exac"),
        course=(
            "was treated with nebulized bronchodilators and systemic steroids",
            "received steroids, azithromycin and nebulizers",
        ),
        meds=(("prednisone 40 mg daily for 5 days",), ("albuterol inhaler as needed",)),
    ),
    "pneumonia": _Reason(
        "pneumonia", weight=1.2, service="primary care", stay=4,
        implies=None, frailty=1.0,
        narrative=("community-acquired pneumonia", "a right lower lobe pneumonia"),
        terse=("pneumonia", "PNA"),
        course=(
            "was treated with intravenous ceftriaxone and azithromycin",
            "was treated with IV antibiotics and supplemental oxygen",
        ),
        meds=(("amoxicillin-clavulanate 875 mg twice daily", "cefpodoxime 200 mg twice daily"),),
    ),
    "sepsis": _Reason(
        "sepsis", weight=0.9, service="infectious disease", stay=6,
        implies=None, frailty=1.2,
        narrative=("sepsis from a urinary source", "sepsis from a presumed pulmonary source"),
        terse=("sepsis", "urosepsis"),
        course=(
            "received fluid resuscitation and broad-spectrum antibiotics",
            "required a brief ICU stay for pressors",
        ),
        meds=(("ciprofloxacin 500 mg twice daily", "cefpodoxime 200 mg twice daily"),),
    ),
    "gi_bleed": _Reason(
        "GI bleed", weight=0.7, service="gastroenterology", stay=4,
        implies=None, frailty=1.1,
        narrative=("an upper GI bleed", "a lower GI bleed"),
        terse=("GI bleed", "UGIB"),
        course=(
            "underwent endoscopy and received two units of packed red cells",
            "was transfused and scoped without further bleeding",
        ),
        meds=(("pantoprazole 40 mg twice daily",),),
    ),
    "hip_fracture": _Reason(
        "hip fracture", weight=0.6, service="orthopedics", stay=5,
        implies=None, frailty=1.0,
        narrative=("a right hip fracture after a fall", "a left hip fracture after a fall"),
        terse=("hip fracture", "hip fx s/p fall"),
        course=(
            "underwent surgical repair on hospital day 2",
            "had operative fixation and worked with physical therapy",
        ),
        meds=(("oxycodone 5 mg every 6 hours as needed",), ("enoxaparin 40 mg daily",)),
    ),
    "stroke": _Reason(
        "stroke", weight=0.6, service="neurology", stay=5,
        implies=None, frailty=1.0,
        narrative=("an acute ischemic stroke", "a small left-sided ischemic stroke"),
        terse=("stroke", "CVA"),
        course=(
            "was evaluated by neurology; MRI showed a small infarct",
            "had residual mild weakness and was seen by speech therapy",
        ),
        meds=(("aspirin 81 mg daily",), ("atorvastatin 80 mg nightly",)),
    ),
    "dka": _Reason(
        "diabetic ketoacidosis", weight=0.4, service="endocrinology", stay=3,
        implies="diabetes", frailty=0.8,
        narrative=("diabetic ketoacidosis",),
        terse=("DKA", "diabetic ketoacidosis"),
        course=(
            "was treated with an insulin infusion and fluids until the gap closed",
            "was treated per DKA protocol",
        ),
        meds=(("insulin glargine 24 units nightly",), ("insulin lispro with meals",)),
    ),
    "cellulitis": _Reason(
        "cellulitis", weight=0.8, service="primary care", stay=3,
        implies=None, frailty=0.8,
        narrative=("cellulitis of the left leg", "cellulitis of the right leg"),
        terse=("cellulitis", "leg cellulitis"),
        course=(
            "was treated with IV cefazolin with improving erythema",
            "improved on IV antibiotics",
        ),
        meds=(("cephalexin 500 mg four times daily",),),
    ),
    "knee_replacement": _Reason(
        "elective knee replacement", weight=0.8, service="orthopedics", stay=2,
        implies=None, frailty=0.5,
        narrative=("an elective total knee replacement", "a planned knee arthroplasty"),
        terse=("elective TKA", "elective knee replacement"),
        course=(
            "underwent uncomplicated total knee arthroplasty",
            "had an uneventful knee replacement",
        ),
        meds=(("acetaminophen 1 g three times daily",), ("aspirin 81 mg twice daily",)),
    ),
    "chest_pain": _Reason(
        "chest pain", weight=0.9, service="cardiology", stay=1.5,
        implies=None, frailty=0.8,
        narrative=("chest pain; myocardial infarction was ruled out", "atypical chest pain"),
        terse=("chest pain, MI r/o", "chest pain"),
        course=(
            "had negative serial troponins and a normal stress test",
            "was ruled out for acute coronary syndrome",
        ),
        meds=(("aspirin 81 mg daily",),),
    ),
    "hepatic_encephalopathy": _Reason(
        "hepatic encephalopathy", weight=0.3, service="hepatology", stay=5,
        implies="cirrhosis", frailty=1.2,
        narrative=("hepatic encephalopathy",),
        terse=("hepatic encephalopathy", "HE"),
        course=(
            "was treated with lactulose with improved mental status",
            "improved on lactulose and rifaximin",
        ),
        meds=(("lactulose 20 g three times daily",), ("rifaximin 550 mg twice daily",)),
    ),
    "uti": _Reason(
        "urinary tract infection", weight=0.7, service="primary care", stay=3,
        implies=None, frailty=1.0,
        narrative=("a urinary tract infection", "a complicated urinary tract infection"),
        terse=("UTI",),
        course=(
            "was treated with IV ceftriaxone, narrowed per cultures",
            "improved on antibiotics",
        ),
        meds=(("nitrofurantoin 100 mg twice daily", "cephalexin 500 mg twice daily"),),
    ),
    "syncope": _Reason(
        "syncope", weight=0.6, service="cardiology", stay=2,
        implies=None, frailty=0.9,
        narrative=("syncope", "a syncopal episode"),
        terse=("syncope",),
        course=(
            "had unremarkable telemetry and a normal echocardiogram",
            "had orthostatic vitals and a benign work-up",
        ),
        meds=(),
    ),
}

COMORBIDITIES: dict[str, _Comorbidity] = {
    "chf": _Comorbidity(
        terse="CHF", prevalence=0.18, age_slope=0.03,
        narrative=(
            "congestive heart failure",
            "chronic heart failure",
            "heart failure with reduced ejection fraction",
        ),
        meds=(
            ("metoprolol succinate 25 mg daily", "carvedilol 12.5 mg twice daily"),
            ("lisinopril 10 mg daily", "valsartan 80 mg daily"),
        ),
    ),
    "copd": _Comorbidity(
        terse="COPD", prevalence=0.16, age_slope=0.02,
        narrative=("COPD", "chronic obstructive pulmonary disease"),
        meds=(("tiotropium inhaler daily",), ("albuterol inhaler as needed",)),
    ),
    "ckd": _Comorbidity(
        terse="CKD", prevalence=0.18, age_slope=0.03,
        narrative=("chronic kidney disease", "chronic kidney disease stage 3", "CKD stage 4"),
        meds=(("sodium bicarbonate 650 mg twice daily", "calcitriol 0.25 mcg daily"),),
    ),
    "diabetes": _Comorbidity(
        terse="DM2", prevalence=0.28, age_slope=0.01,
        narrative=("type 2 diabetes", "diabetes mellitus", "insulin-dependent diabetes"),
        meds=(("metformin 500 mg twice daily", "insulin glargine 20 units nightly"),),
    ),
    "afib": _Comorbidity(
        terse="AFib", prevalence=0.14, age_slope=0.05,
        narrative=("atrial fibrillation", "paroxysmal atrial fibrillation"),
        meds=(("apixaban 5 mg twice daily", "warfarin 5 mg daily"), ("diltiazem 120 mg daily",)),
    ),
    "cirrhosis": _Comorbidity(
        terse="cirrhosis", prevalence=0.05, age_slope=-0.02,
        narrative=("cirrhosis", "alcohol-related cirrhosis"),
        meds=(("spironolactone 50 mg daily",), ("lactulose 20 g twice daily",)),
    ),
    "dementia": _Comorbidity(
        terse="dementia", prevalence=0.06, age_slope=0.09,
        narrative=("dementia", "moderate dementia"),
        meds=(("donepezil 10 mg nightly",),),
    ),
    "cancer": _Comorbidity(
        terse="cancer", prevalence=0.1, age_slope=0.02,
        narrative=(
            "metastatic lung cancer",
            "colon cancer on chemotherapy",
            "breast cancer under treatment",
            "prostate cancer",
        ),
        meds=(("ondansetron 8 mg as needed for nausea",),),
    ),
    "hypertension": _Comorbidity(
        terse="HTN", prevalence=0.5, age_slope=0.03,
        narrative=("hypertension",),
        meds=(("amlodipine 5 mg daily", "hydrochlorothiazide 25 mg daily"),),
    ),
    "hyperlipidemia": _Comorbidity(
        terse="HLD", prevalence=0.38, age_slope=0.01,
        narrative=("hyperlipidemia",),
        meds=(("atorvastatin 40 mg nightly",),),
    ),
    "depression": _Comorbidity(
        terse="depression", prevalence=0.14, age_slope=0.0,
        narrative=("depression", "major depressive disorder"),
        meds=(("sertraline 50 mg daily",),),
    ),
    "obesity": _Comorbidity(
        terse="obesity", prevalence=0.2, age_slope=-0.01,
        narrative=("obesity",),
        meds=(),
    ),
}
# fmt: on

DISPOSITIONS: dict[str, tuple[str, str, str]] = {  # canonical, narrative, terse
    "home": ("home", "discharged home", "home"),
    "home_services": (
        "home with services",
        "discharged home with home health services",
        "home w/ services",
    ),
    "snf": ("skilled nursing facility", "discharged to a skilled nursing facility", "SNF"),
    "rehab": ("rehabilitation facility", "discharged to an acute rehabilitation facility", "rehab"),
    "ama": ("left against medical advice", "left against medical advice", "left AMA"),
}
SERIOUS_COMORBIDITIES = frozenset({"chf", "copd", "ckd", "cirrhosis", "dementia", "cancer"})
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")
FOLLOW_UP_DAYS = (3, 5, 7, 7, 7, 10, 14, 14, 21, 30)


@dataclass(frozen=True)
class SiteProfile:
    """One site's case mix, readmission prevalence, size and note style."""

    name: str
    index: int
    train_records: int
    test_records: int
    mean_age: float
    age_sd: float
    female_fraction: float
    reason_weights: tuple[float, ...]  # aligned with REASONS, sums to 1
    comorbidity_scale: tuple[float, ...]  # aligned with COMORBIDITIES
    prior_admission_rate: float  # multiplier on the expected number of prior admissions
    no_follow_up_rate: float
    style_weights: tuple[float, ...]  # aligned with STYLES, sums to 1
    target_prevalence: float
    intercept_shift: float  # site term of the logit, solved so mean risk = target_prevalence

    @property
    def dominant_style(self) -> str:
        """The site's most frequent note style."""
        return STYLES[int(np.argmax(self.style_weights))]


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


@dataclass(frozen=True)
class SiteData:
    """One site's records; risk holds each record's true readmission probability."""

    profile: SiteProfile
    train: tuple[dict[str, Any], ...]
    test: tuple[dict[str, Any], ...]
    instruct_train: tuple[dict[str, str], ...]
    instruct_test: tuple[dict[str, str], ...]
    train_risk: tuple[float, ...]
    test_risk: tuple[float, ...]


@dataclass(frozen=True)
class SiteSummary:
    """Numbers describing one written site."""

    name: str
    train_records: int
    test_records: int
    prevalence: float
    test_prevalence: float
    mean_risk: float
    bayes_auroc: float | None  # AUROC of the true risk on the test set; None if one class
    intercept_shift: float
    dominant_style: str
    mean_words: float


@dataclass(frozen=True)
class FederationSummary:
    """What write_federation wrote; also saved as federation.json."""

    out_dir: Path
    seed: int
    sites: tuple[SiteSummary, ...]

    def to_json(self) -> dict[str, Any]:
        """The federation.json payload: numbers and names only, never record text."""
        return {
            "seed": self.seed,
            "num_sites": len(self.sites),
            "risk_model": dict(RISK_MODEL),
            "sites": [vars(site) for site in self.sites],
        }


def age_band(age: int) -> str:
    """Coarse age band used as a subgroup column."""
    for low, high, band in AGE_BANDS:
        if low <= age <= high:
            return band
    return OLDEST_AGE_BAND


def risk_logit(patient: Patient, intercept_shift: float = 0.0) -> float:
    """Log-odds of 30-day readmission under RISK_MODEL."""
    m = RISK_MODEL
    logit = m["intercept"] + intercept_shift
    logit += m["age_per_decade_over_65"] * (patient.age - 65) / 10
    logit += m["sex:M"] * (patient.sex == "M")
    logit += m[f"reason:{patient.reason}"] + m[f"disposition:{patient.disposition}"]
    logit += sum(m[f"comorbidity:{c}"] for c in patient.comorbidities)
    logit += m["prior_admissions_each_up_to_4"] * min(patient.prior_admissions, 4)
    if patient.follow_up_days is None:
        logit += m["follow_up:none"]
    elif patient.follow_up_days <= 7:
        logit += m["follow_up:within_7_days"]
    logit += m["length_of_stay_per_day_up_to_14"] * min(patient.length_of_stay, 14)
    logit += m["creatinine_per_mg_dl_over_1.2"] * max(0.0, patient.creatinine - 1.2)
    logit += m["hemoglobin_per_g_dl_under_11"] * max(0.0, 11.0 - patient.hemoglobin)
    logit += m["sodium_per_mmol_under_135"] * max(0, 135 - patient.sodium)
    logit += m["bnp_elevated"] * bool(patient.bnp_elevated)
    return logit


def readmission_risk(patient: Patient, intercept_shift: float = 0.0) -> float:
    """True probability of 30-day readmission."""
    return 1.0 / (1.0 + math.exp(-risk_logit(patient, intercept_shift)))


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.random() * len(options))]


def _weighted(rng: np.random.Generator, keys: Sequence[str], weights: Sequence[float]) -> str:
    cumulative = list(accumulate(weights))
    index = bisect_right(cumulative, rng.random() * cumulative[-1])
    return keys[min(index, len(keys) - 1)]


def sample_patient(profile: SiteProfile, rng: np.random.Generator) -> Patient:
    """Draw one admission from the site's case mix."""
    age = round(float(rng.normal(profile.mean_age, profile.age_sd)))
    while not 18 <= age <= MAX_AGE:
        age = round(float(rng.normal(profile.mean_age, profile.age_sd)))
    sex = "F" if rng.random() < profile.female_fraction else "M"
    reason_key = _weighted(rng, list(REASONS), profile.reason_weights)
    reason = REASONS[reason_key]
    comorbidities = []
    for (key, c), scale in zip(COMORBIDITIES.items(), profile.comorbidity_scale, strict=True):
        p = c.prevalence * scale * reason.frailty * math.exp(c.age_slope * (age - 65))
        if key == reason.implies or rng.random() < min(p, 0.9):
            comorbidities.append(key)
    present = set(comorbidities)

    male = sex == "M"
    creatinine = math.exp(rng.normal(math.log(1.0 if male else 0.85), 0.15))
    if "ckd" in present:
        creatinine *= math.exp(rng.normal(math.log(2.0), 0.25))
    if reason_key in ("sepsis", "dka", "heart_failure", "gi_bleed") and rng.random() < 0.35:
        creatinine *= 1.6
    hemoglobin = rng.normal(13.8 if male else 12.8, 1.1)
    hemoglobin -= (
        3.5 * (reason_key == "gi_bleed") + 1.5 * ("cancer" in present) + 1.2 * ("ckd" in present)
    )
    hemoglobin -= 1.0 * ("cirrhosis" in present) + 0.8 * (reason_key == "sepsis")
    sodium = rng.normal(139, 2.5) - 5 * ("cirrhosis" in present) - 2 * (reason_key == "sepsis")
    sodium -= 3 * (reason_key == "heart_failure")
    cardiac = ("chf" in present) or reason_key in ("heart_failure", "copd_exacerbation", "syncope")
    bnp = None
    if cardiac:
        bnp = bool(rng.random() < (0.9 if ("chf" in present) else 0.25))

    significant = sum(c in SERIOUS_COMORBIDITIES for c in comorbidities)
    stay = reason.stay * math.exp(rng.normal(0, 0.35)) + 0.4 * significant
    length_of_stay = int(min(21, max(1, round(stay))))

    weights = {
        "home": 1.0,
        "home_services": 0.2 + 0.02 * max(0, age - 60) + 0.1 * significant,
        "snf": 0.03 + 0.035 * max(0, age - 65) + 0.8 * ("dementia" in present),
        "rehab": 0.05,
        "ama": 0.03 + 0.08 * (age < 50) + 0.12 * ("cirrhosis" in present),
    }
    if reason_key in ("hip_fracture", "stroke"):
        weights["snf"] += 1.2
        weights["rehab"] += 0.8
    if reason_key == "knee_replacement":
        weights["rehab"] += 0.4
        weights["ama"] = 0.0
    disposition = _weighted(rng, list(weights), list(weights.values()))
    if disposition == "ama":
        length_of_stay = max(1, length_of_stay // 2)

    expected_prior = profile.prior_admission_rate * (0.15 + 0.3 * significant)
    expected_prior += 0.35 * (reason.implies is not None)
    prior_admissions = int(min(6, rng.poisson(expected_prior)))

    no_follow_up = 0.85 if disposition == "ama" else profile.no_follow_up_rate
    follow_up_days = None
    if rng.random() >= no_follow_up:
        follow_up_days = FOLLOW_UP_DAYS[int(rng.random() * len(FOLLOW_UP_DAYS))]
    service = reason.service if rng.random() < 0.6 else "primary care"

    medications: list[str] = []
    groups = list(reason.meds)
    for c in comorbidities:
        groups.extend(COMORBIDITIES[c].meds)
    for group in groups:
        med = _pick(rng, group)
        if med not in medications:
            medications.append(med)
    return Patient(
        age=age,
        sex=sex,
        reason=reason_key,
        comorbidities=tuple(comorbidities),
        creatinine=round(creatinine, 1),
        hemoglobin=round(min(max(float(hemoglobin), 6.0), 17.5), 1),
        sodium=min(max(round(float(sodium)), 121), 148),
        bnp_elevated=bnp,
        length_of_stay=length_of_stay,
        disposition=disposition,
        prior_admissions=prior_admissions,
        follow_up_days=follow_up_days,
        follow_up_service=service,
        medications=tuple(medications),
    )


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
            return _pick(rng, ("No f/u arranged.", "No follow-up arranged."))
        if style == "sectioned":
            return _pick(rng, ("Follow-up: no follow-up arranged", "Follow-up: none arranged"))
        return _pick(rng, ("No follow-up arranged.", "No follow-up appointment was arranged."))
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
        return _pick(rng, ("No prior admissions in the past year.", "First admission this year."))
    return _pick(
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
        f"{p.age}{p.sex} adm for {_pick(rng, reason.terse)}.",
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
    person = _pick(rng, ("woman", "woman", "female") if female else ("man", "man", "male"))
    pronoun = "She" if female else "He"
    history = _join([_pick(rng, COMORBIDITIES[c].narrative) for c in p.comorbidities])
    history = f"a history of {history}" if history else "no significant past medical history"
    who = f"{p.age}-year-old {person} with {history}"
    admitted = _pick(rng, reason.narrative)
    opener = _pick(
        rng,
        (
            f"{_article(p.age).capitalize()} {who} was admitted for {admitted}.",
            f"The patient is {_article(p.age)} {who} who was admitted for {admitted}.",
        ),
    )
    course = f"{pronoun} {_pick(rng, reason.course)}"
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
    history = "; ".join(_pick(rng, COMORBIDITIES[c].narrative) for c in p.comorbidities)
    admitted = _pick(rng, reason.narrative).removeprefix("a ").removeprefix("an ")
    course = _pick(rng, reason.course).removeprefix("was ")
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


def _spread(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """n values evenly spread over [low, high] in random order, so sites always differ."""
    if n == 1:
        return np.array([(low + high) / 2])
    return rng.permutation(np.linspace(low, high, n))


def _solve_shift(profile: SiteProfile, rng: np.random.Generator, samples: int = 2000) -> float:
    """Intercept shift that makes the site's mean risk equal its target prevalence."""
    logits = np.array([risk_logit(sample_patient(profile, rng)) for _ in range(samples)])
    low, high = -6.0, 6.0
    for _ in range(50):
        mid = (low + high) / 2
        if np.mean(1 / (1 + np.exp(-(logits + mid)))) < profile.target_prevalence:
            low = mid
        else:
            high = mid
    return round((low + high) / 2, 4)


def site_profiles(
    num_sites: int, seed: int = 0, records_per_site: int | None = None, test_records: int = 200
) -> list[SiteProfile]:
    """Draw heterogeneous sites: case mix, prevalence 0.20-0.45, size, dominant note style."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if records_per_site is not None and records_per_site < 1:
        raise ValueError(f"records_per_site must be at least 1, got {records_per_site}")
    if test_records < 1:
        raise ValueError(f"test_records must be at least 1, got {test_records}")
    mean_records = records_per_site or DEFAULT_MEAN_RECORDS
    rng = np.random.default_rng([seed, 0, 0])
    sizes = _spread(rng, 0.45, 1.55, num_sites) * mean_records
    prevalences = _spread(rng, 0.22, 0.43, num_sites)
    dominant = [STYLES[int(i) % len(STYLES)] for i in rng.permutation(num_sites)]
    base_reasons = np.array([r.weight for r in REASONS.values()])
    profiles = []
    for i in range(num_sites):
        site_rng = np.random.default_rng([seed, i + 1, 0])
        reasons = base_reasons * np.exp(site_rng.normal(0, 0.7, len(base_reasons)))
        share = float(site_rng.uniform(0.6, 0.8))
        styles = [share if s == dominant[i] else (1 - share) / 2 for s in STYLES]
        jitter = float(site_rng.uniform(-0.015, 0.015))
        profile = SiteProfile(
            name=f"site-{i + 1}",
            index=i + 1,
            train_records=max(1, round(float(sizes[i]))),
            test_records=test_records,
            mean_age=round(float(site_rng.uniform(58, 76)), 2),
            age_sd=round(float(site_rng.uniform(11, 16)), 2),
            female_fraction=round(float(site_rng.uniform(0.42, 0.6)), 3),
            reason_weights=tuple(round(float(w), 4) for w in reasons / reasons.sum()),
            comorbidity_scale=tuple(
                round(float(s), 3) for s in np.exp(site_rng.normal(0, 0.35, len(COMORBIDITIES)))
            ),
            prior_admission_rate=round(float(np.exp(site_rng.normal(0, 0.3))), 3),
            no_follow_up_rate=round(float(site_rng.uniform(0.08, 0.35)), 3),
            style_weights=tuple(round(w, 4) for w in styles),
            target_prevalence=round(float(np.clip(prevalences[i] + jitter, 0.2, 0.45)), 4),
            intercept_shift=0.0,
        )
        shift = _solve_shift(profile, np.random.default_rng([seed, i + 1, 1]))
        profiles.append(replace(profile, intercept_shift=shift))
    return profiles


def _cases(
    profile: SiteProfile, count: int, rng: np.random.Generator
) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[float]]:
    records, instructs, risks = [], [], []
    for _ in range(count):
        patient = sample_patient(profile, rng)
        risk = readmission_risk(patient, profile.intercept_shift)
        label = int(rng.random() < risk)
        style = _weighted(rng, STYLES, profile.style_weights)
        note = render_note(patient, style, rng)
        records.append(
            {"text": note, "label": label, "age_band": age_band(patient.age), "sex": patient.sex}
        )
        instructs.append(instruct_record(note, patient, label, rng))
        risks.append(round(risk, 6))
    return records, instructs, risks


def generate_site(profile: SiteProfile, seed: int = 0) -> SiteData:
    """Generate a site's train and held-out test records (classification and instruction)."""
    train, instruct_train, train_risk = _cases(
        profile, profile.train_records, np.random.default_rng([seed, profile.index, 10])
    )
    test, instruct_test, test_risk = _cases(
        profile, profile.test_records, np.random.default_rng([seed, profile.index, 11])
    )
    return SiteData(
        profile=profile,
        train=tuple(train),
        test=tuple(test),
        instruct_train=tuple(instruct_train),
        instruct_test=tuple(instruct_test),
        train_risk=tuple(train_risk),
        test_risk=tuple(test_risk),
    )


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # synthetic data; mkstemp's 0600 would lock out other readers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)


def summarize_site(data: SiteData) -> SiteSummary:
    """Prevalence, mean risk and mean note length of one generated site."""
    labels = [r["label"] for r in data.train]
    test_labels = [r["label"] for r in data.test]
    words = [len(r["text"].split()) for r in data.train]
    return SiteSummary(
        name=data.profile.name,
        train_records=len(data.train),
        test_records=len(data.test),
        prevalence=round(float(np.mean(labels)), 4),
        test_prevalence=round(float(np.mean(test_labels)), 4),
        mean_risk=round(float(np.mean(data.train_risk)), 4),
        bayes_auroc=round(float(roc_auc_score(test_labels, data.test_risk)), 4)
        if 0 < sum(test_labels) < len(test_labels)
        else None,
        intercept_shift=data.profile.intercept_shift,
        dominant_style=data.profile.dominant_style,
        mean_words=round(float(np.mean(words)), 1),
    )


def write_federation(
    out_dir: Path,
    num_sites: int,
    seed: int = 0,
    records_per_site: int | None = None,
    test_records: int = 200,
) -> FederationSummary:
    """Write OUT/site-N/{train,test,instruct-train,instruct-test}.jsonl and OUT/federation.json."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(out_dir))
    summaries = []
    for profile in site_profiles(num_sites, seed, records_per_site, test_records):
        data = generate_site(profile, seed)
        site_dir = out_dir / profile.name
        _write_atomic(site_dir / "train.jsonl", _jsonl(data.train))
        _write_atomic(site_dir / "test.jsonl", _jsonl(data.test))
        _write_atomic(site_dir / "instruct-train.jsonl", _jsonl(data.instruct_train))
        _write_atomic(site_dir / "instruct-test.jsonl", _jsonl(data.instruct_test))
        summaries.append(summarize_site(data))
        logger.info(
            "wrote %s: %d train, %d test records", site_dir, len(data.train), len(data.test)
        )
    stale = sorted(
        p.name
        for p in out_dir.glob("site-*")
        if p.is_dir() and p.name not in {s.name for s in summaries}
    )
    if stale:
        logger.warning("%s holds sites from an earlier run, left untouched: %s", out_dir, stale)
    summary = FederationSummary(out_dir=out_dir, seed=seed, sites=tuple(summaries))
    _write_atomic(out_dir / "federation.json", json.dumps(summary.to_json(), indent=2) + "\n")
    return summary
