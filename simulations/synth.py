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

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

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
    "reason:heart_failure": 0.6,
    "reason:copd_exacerbation": 0.5,
    "reason:pneumonia": 0.15,
    "reason:sepsis": 0.35,
    "reason:gi_bleed": 0.3,
    "reason:hip_fracture": 0.0,
    "reason:stroke": 0.1,
    "reason:dka": 0.45,
    "reason:cellulitis": -0.4,
    "reason:knee_replacement": -1.4,
    "reason:chest_pain": -0.8,
    "reason:hepatic_encephalopathy": 0.7,
    "reason:uti": -0.1,
    "reason:syncope": -0.5,
    "comorbidity:chf": 0.45,
    "comorbidity:copd": 0.35,
    "comorbidity:ckd": 0.4,
    "comorbidity:diabetes": 0.15,
    "comorbidity:afib": 0.15,
    "comorbidity:cirrhosis": 0.6,
    "comorbidity:dementia": 0.35,
    "comorbidity:cancer": 0.5,
    "comorbidity:depression": 0.1,
    "comorbidity:hypertension": 0.0,
    "comorbidity:hyperlipidemia": 0.0,
    "comorbidity:obesity": 0.0,
    "disposition:home": 0.0,
    "disposition:home_services": 0.3,
    "disposition:snf": 0.6,
    "disposition:rehab": 0.2,
    "disposition:ama": 1.2,
    "prior_admissions_each_up_to_4": 0.32,
    "follow_up:none": 0.7,
    "follow_up:within_7_days": -0.25,
    "length_of_stay_per_day_up_to_14": 0.04,
    "creatinine_per_mg_dl_over_1.2": 0.25,
    "hemoglobin_per_g_dl_under_11": 0.12,
    "sodium_per_mmol_under_135": 0.04,
    "bnp_elevated": 0.15,
}


@dataclass(frozen=True)
class _Reason:
    canonical: str
    narrative: tuple[str, ...]  # with article, after "admitted with"
    terse: tuple[str, ...]
    weight: float  # base share of admissions
    service: str  # follow-up clinic
    stay: float  # typical length of stay in days
    implies: str | None  # comorbidity the reason entails
    frailty: float  # multiplier on comorbidity prevalence
    course: tuple[str, ...]
    meds: tuple[tuple[str, ...], ...]


REASONS: dict[str, _Reason] = {
    "heart_failure": _Reason(
        "heart failure exacerbation", ("a heart failure exacerbation", "acute decompensated heart failure"),
        ("CHF exacerbation", "CHF exac"), 1.2, "cardiology", 5, "chf", 1.3,
        ("diuresed with intravenous furosemide with good urine output", "treated with IV diuresis and weaned off oxygen"),
        (("furosemide 40 mg daily", "furosemide 80 mg twice daily", "torsemide 20 mg daily"),),
    ),
    "copd_exacerbation": _Reason(
        "COPD exacerbation", ("a COPD exacerbation", "an acute exacerbation of COPD"),
        ("COPD exacerbation", "COPD exac"), 1.0, "pulmonology", 4, "copd", 1.2,
        ("treated with nebulized bronchodilators and systemic steroids", "given steroids, azithromycin and nebulizers"),
        (("prednisone 40 mg daily for 5 days",), ("albuterol inhaler as needed",)),
    ),
    "pneumonia": _Reason(
        "pneumonia", ("community-acquired pneumonia", "a right lower lobe pneumonia"),
        ("pneumonia", "PNA"), 1.2, "primary care", 4, None, 1.0,
        ("treated with intravenous ceftriaxone and azithromycin", "treated with IV antibiotics and supplemental oxygen"),
        (("amoxicillin-clavulanate 875 mg twice daily", "cefpodoxime 200 mg twice daily"),),
    ),
    "sepsis": _Reason(
        "sepsis", ("sepsis from a urinary source", "sepsis from a presumed pulmonary source"),
        ("sepsis", "urosepsis"), 0.9, "infectious disease", 6, None, 1.2,
        ("received fluid resuscitation and broad-spectrum antibiotics", "required a brief ICU stay for pressors"),
        (("ciprofloxacin 500 mg twice daily", "cefpodoxime 200 mg twice daily"),),
    ),
    "gi_bleed": _Reason(
        "GI bleed", ("an upper GI bleed", "a lower GI bleed"), ("GI bleed", "UGIB"), 0.7,
        "gastroenterology", 4, None, 1.1,
        ("underwent endoscopy and received two units of packed red cells", "transfused and scoped without further bleeding"),
        (("pantoprazole 40 mg twice daily",),),
    ),
    "hip_fracture": _Reason(
        "hip fracture", ("a right hip fracture after a fall", "a left hip fracture after a fall"),
        ("hip fracture", "hip fx s/p fall"), 0.6, "orthopedics", 5, None, 1.0,
        ("underwent surgical repair on hospital day 2", "had operative fixation and worked with physical therapy"),
        (("oxycodone 5 mg every 6 hours as needed",), ("enoxaparin 40 mg daily",)),
    ),
    "stroke": _Reason(
        "stroke", ("an acute ischemic stroke", "a small left-sided ischemic stroke"),
        ("stroke", "CVA"), 0.6, "neurology", 5, None, 1.0,
        ("evaluated by neurology; MRI showed a small infarct", "had residual mild weakness with speech therapy input"),
        (("aspirin 81 mg daily",), ("atorvastatin 80 mg nightly",)),
    ),
    "dka": _Reason(
        "diabetic ketoacidosis", ("diabetic ketoacidosis",), ("DKA", "diabetic ketoacidosis"), 0.4,
        "endocrinology", 3, "diabetes", 0.8,
        ("treated with an insulin infusion and fluids until the gap closed", "treated per DKA protocol"),
        (("insulin glargine 24 units nightly",), ("insulin lispro with meals",)),
    ),
    "cellulitis": _Reason(
        "cellulitis", ("cellulitis of the left leg", "cellulitis of the right leg"),
        ("cellulitis", "LLE cellulitis"), 0.8, "primary care", 3, None, 0.8,
        ("treated with IV cefazolin with improving erythema", "improved on IV antibiotics"),
        (("cephalexin 500 mg four times daily",),),
    ),
    "knee_replacement": _Reason(
        "elective knee replacement", ("an elective total knee replacement", "a planned knee arthroplasty"),
        ("elective TKA", "elective knee replacement"), 0.8, "orthopedics", 2, None, 0.5,
        ("underwent uncomplicated total knee arthroplasty", "had an uneventful knee replacement"),
        (("acetaminophen 1 g three times daily",), ("aspirin 81 mg twice daily",)),
    ),
    "chest_pain": _Reason(
        "chest pain", ("chest pain; myocardial infarction was ruled out", "atypical chest pain"),
        ("chest pain, MI r/o", "chest pain"), 0.9, "cardiology", 1.5, None, 0.8,
        ("serial troponins were negative and a stress test was normal", "ruled out for acute coronary syndrome"),
        (("aspirin 81 mg daily",),),
    ),
    "hepatic_encephalopathy": _Reason(
        "hepatic encephalopathy", ("hepatic encephalopathy",), ("hepatic encephalopathy", "HE"), 0.3,
        "hepatology", 5, "cirrhosis", 1.2,
        ("treated with lactulose with improved mental status", "improved on lactulose and rifaximin"),
        (("lactulose 20 g three times daily",), ("rifaximin 550 mg twice daily",)),
    ),
    "uti": _Reason(
        "urinary tract infection", ("a urinary tract infection", "a complicated urinary tract infection"),
        ("UTI",), 0.7, "primary care", 3, None, 1.0,
        ("treated with IV ceftriaxone and narrowed per cultures", "improved on antibiotics"),
        (("nitrofurantoin 100 mg twice daily", "cephalexin 500 mg twice daily"),),
    ),
    "syncope": _Reason(
        "syncope", ("syncope", "a syncopal episode"), ("syncope",), 0.6, "cardiology", 2, None, 0.9,
        ("telemetry was unremarkable and an echocardiogram was normal", "had orthostatic vitals and a benign work-up"),
        (),
    ),
}


@dataclass(frozen=True)
class _Comorbidity:
    narrative: tuple[str, ...]
    terse: str
    prevalence: float
    age_slope: float  # log-odds-like growth per year over 65
    meds: tuple[tuple[str, ...], ...]


COMORBIDITIES: dict[str, _Comorbidity] = {
    "chf": _Comorbidity(("congestive heart failure", "chronic heart failure", "heart failure with reduced ejection fraction"), "CHF", 0.18, 0.03,
                        (("metoprolol succinate 25 mg daily", "carvedilol 12.5 mg twice daily"), ("lisinopril 10 mg daily", "sacubitril-valsartan 24-26 mg twice daily"))),
    "copd": _Comorbidity(("COPD", "chronic obstructive pulmonary disease"), "COPD", 0.16, 0.02,
                         (("tiotropium inhaler daily",), ("albuterol inhaler as needed",))),
    "ckd": _Comorbidity(("chronic kidney disease", "chronic kidney disease stage 3", "CKD stage 4"), "CKD", 0.18, 0.03,
                        (("sodium bicarbonate 650 mg twice daily", "calcitriol 0.25 mcg daily"),)),
    "diabetes": _Comorbidity(("type 2 diabetes", "diabetes mellitus", "insulin-dependent diabetes"), "DM2", 0.28, 0.01,
                             (("metformin 500 mg twice daily", "insulin glargine 20 units nightly"),)),
    "afib": _Comorbidity(("atrial fibrillation", "paroxysmal atrial fibrillation"), "AFib", 0.14, 0.05,
                         (("apixaban 5 mg twice daily", "warfarin 5 mg daily"), ("diltiazem 120 mg daily",))),
    "cirrhosis": _Comorbidity(("cirrhosis", "alcohol-related cirrhosis"), "cirrhosis", 0.05, -0.02,
                              (("spironolactone 50 mg daily",), ("lactulose 20 g twice daily",))),
    "dementia": _Comorbidity(("dementia", "moderate dementia"), "dementia", 0.06, 0.09,
                             (("donepezil 10 mg nightly",),)),
    "cancer": _Comorbidity(("metastatic lung cancer", "colon cancer on chemotherapy", "breast cancer under treatment", "prostate cancer"), "cancer", 0.1, 0.02,
                           (("ondansetron 8 mg as needed for nausea",),)),
    "hypertension": _Comorbidity(("hypertension",), "HTN", 0.5, 0.03, (("amlodipine 5 mg daily", "hydrochlorothiazide 25 mg daily"),)),
    "hyperlipidemia": _Comorbidity(("hyperlipidemia",), "HLD", 0.38, 0.01, (("atorvastatin 40 mg nightly",),)),
    "depression": _Comorbidity(("depression", "major depressive disorder"), "depression", 0.14, 0.0, (("sertraline 50 mg daily",),)),
    "obesity": _Comorbidity(("obesity",), "obesity", 0.2, -0.01, ()),
}

DISPOSITIONS: dict[str, tuple[str, str, str]] = {  # canonical, narrative, terse
    "home": ("home", "discharged home", "home"),
    "home_services": ("home with services", "discharged home with home health services", "home w/ services"),
    "snf": ("skilled nursing facility", "discharged to a skilled nursing facility", "SNF"),
    "rehab": ("rehabilitation facility", "discharged to an acute rehabilitation facility", "rehab"),
    "ama": ("left against medical advice", "left against medical advice", "left AMA"),
}
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
    return options[int(rng.integers(len(options)))]


def _weighted(rng: np.random.Generator, keys: Sequence[str], weights: Sequence[float]) -> str:
    p = np.asarray(weights, dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def sample_patient(profile: SiteProfile, rng: np.random.Generator) -> Patient:
    """Draw one admission from the site's case mix."""
    age = int(round(rng.normal(profile.mean_age, profile.age_sd)))
    while not 18 <= age <= MAX_AGE:
        age = int(round(rng.normal(profile.mean_age, profile.age_sd)))
    sex = "F" if rng.random() < profile.female_fraction else "M"
    reason_key = _weighted(rng, list(REASONS), profile.reason_weights)
    reason = REASONS[reason_key]
    comorbidities = []
    for (key, c), scale in zip(COMORBIDITIES.items(), profile.comorbidity_scale, strict=True):
        p = c.prevalence * scale * reason.frailty * math.exp(c.age_slope * (age - 65))
        if key == reason.implies or rng.random() < min(p, 0.9):
            comorbidities.append(key)
    has = set(comorbidities).__contains__

    male = sex == "M"
    creatinine = math.exp(rng.normal(math.log(1.0 if male else 0.85), 0.15))
    if has("ckd"):
        creatinine *= math.exp(rng.normal(math.log(2.0), 0.25))
    if reason_key in ("sepsis", "dka", "heart_failure", "gi_bleed") and rng.random() < 0.35:
        creatinine *= 1.6
    hemoglobin = rng.normal(13.8 if male else 12.8, 1.1)
    hemoglobin -= 3.5 * (reason_key == "gi_bleed") + 1.5 * has("cancer") + 1.2 * has("ckd")
    hemoglobin -= 1.0 * has("cirrhosis") + 0.8 * (reason_key == "sepsis")
    sodium = rng.normal(139, 2.5) - 5 * has("cirrhosis") - 2 * (reason_key == "sepsis")
    sodium -= 3 * (reason_key == "heart_failure")
    cardiac = has("chf") or reason_key in ("heart_failure", "copd_exacerbation", "syncope")
    bnp = None
    if cardiac:
        bnp = bool(rng.random() < (0.9 if has("chf") else 0.25))

    significant = sum(RISK_MODEL[f"comorbidity:{c}"] >= 0.3 for c in comorbidities)
    stay = reason.stay * math.exp(rng.normal(0, 0.35)) + 0.4 * significant
    length_of_stay = int(min(21, max(1, round(stay))))

    weights = {
        "home": 1.0,
        "home_services": 0.2 + 0.02 * max(0, age - 60) + 0.1 * significant,
        "snf": 0.03 + 0.035 * max(0, age - 65) + 0.8 * has("dementia"),
        "rehab": 0.05,
        "ama": 0.03 + 0.08 * (age < 50) + 0.12 * has("cirrhosis"),
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
        follow_up_days = int(FOLLOW_UP_DAYS[int(rng.integers(len(FOLLOW_UP_DAYS)))])
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
        hemoglobin=round(float(np.clip(hemoglobin, 6.0, 17.5)), 1),
        sodium=int(np.clip(round(sodium), 121, 148)),
        bnp_elevated=bnp,
        length_of_stay=length_of_stay,
        disposition=disposition,
        prior_admissions=prior_admissions,
        follow_up_days=follow_up_days,
        follow_up_service=service,
        medications=tuple(medications),
    )
