"""Clinical vocabulary of the synthetic notes: reasons, comorbidities, medications, dispositions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of the options, uniformly, from a single draw of rng."""
    return options[int(rng.random() * len(options))]
