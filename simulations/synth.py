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
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sklearn.metrics import roc_auc_score

from common.files import write_atomic
from simulations.notes import STYLES, Patient, instruct_record, render_note
from simulations.vocabulary import (
    COMORBIDITIES,
    FOLLOW_UP_DAYS,
    REASONS,
    SERIOUS_COMORBIDITIES,
    pick,
)

logger = logging.getLogger(__name__)
Spread = TypeVar("Spread", float, np.ndarray)

AGE_BANDS = ((18, 44, "18-44"), (45, 64, "45-64"), (65, 74, "65-74"), (75, 84, "75-84"))
OLDEST_AGE_BAND = "85+"
MAX_AGE = 89  # older ages are identifiers under HIPAA safe harbor; never write one
DEFAULT_MEAN_RECORDS = 575
MAX_HETEROGENEITY = 5.0
# Where heterogeneity 0 puts every site: the centres of the default spreads below.
IID_PREVALENCE = 0.325
IID_MEAN_AGE = 67.0
IID_AGE_SD = 13.5
IID_FEMALE_FRACTION = 0.51
IID_NO_FOLLOW_UP_RATE = 0.215
# Bounds that keep strongly non-IID sites plausible (and never bind at heterogeneity 1).
PREVALENCE_RANGE = (0.08, 0.6)
MIN_RELATIVE_SIZE = 0.15
MAX_DOMINANT_STYLE_SHARE = 0.9

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
        """The site's most frequent note style; `mixed` when no one style leads."""
        top = max(self.style_weights)
        if self.style_weights.count(top) > 1:
            return "mixed"
        return STYLES[self.style_weights.index(top)]


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
    heterogeneity: float = 1.0
    records_per_site: int = DEFAULT_MEAN_RECORDS

    def to_json(self) -> dict[str, Any]:
        """The federation.json payload: numbers and names only, never record text."""
        return {
            "seed": self.seed,
            "heterogeneity": self.heterogeneity,
            "records_per_site": self.records_per_site,
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
        med = pick(rng, group)
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


def _spread(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """n values evenly spread over [low, high] in random order, so sites always differ."""
    if n == 1:
        return np.array([(low + high) / 2])
    return rng.permutation(np.linspace(low, high, n))


def _toward(value: Spread, centre: float, h: float) -> Spread:
    """Move a default-spread value to `centre` (h=0), keep it (h=1) or push it past (h>1).

    Written as h*value + (1-h)*centre, which is exactly `value` at h=1 and exactly `centre`
    at h=0, so the default federation stays byte for byte what it always was.
    """
    return h * value + (1 - h) * centre


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
    num_sites: int,
    seed: int = 0,
    records_per_site: int | None = None,
    test_records: int = 200,
    heterogeneity: float = 1.0,
) -> list[SiteProfile]:
    """Draw sites that differ in case mix, prevalence, size and dominant note style.

    heterogeneity scales how much they differ: 0 makes every site alike (IID: same case mix,
    prevalence, size and style weights; only the patients drawn differ), 1 is the default
    spread (prevalence 0.20-0.45, sizes 45-155% of the mean), larger values spread case mix,
    prevalence (within 0.08-0.6) and size (each site keeping at least 15% of the mean) further
    and make each site's dominant note style more dominant.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if records_per_site is not None and records_per_site < 1:
        raise ValueError(f"records_per_site must be at least 1, got {records_per_site}")
    if test_records < 1:
        raise ValueError(f"test_records must be at least 1, got {test_records}")
    if not 0 <= heterogeneity <= MAX_HETEROGENEITY:
        raise ValueError(
            f"heterogeneity must be between 0 (IID) and {MAX_HETEROGENEITY}, got {heterogeneity}"
        )
    h = float(heterogeneity)
    bounded = min(h, 1.0)  # bounded traits (age, sex, follow-up) spread no wider than at h=1
    mean_records = records_per_site or DEFAULT_MEAN_RECORDS
    rng = np.random.default_rng([seed, 0, 0])
    relative = np.maximum(_toward(_spread(rng, 0.45, 1.55, num_sites), 1.0, h), MIN_RELATIVE_SIZE)
    sizes = relative * mean_records
    prevalences = _toward(_spread(rng, 0.22, 0.43, num_sites), IID_PREVALENCE, h)
    dominant = [STYLES[int(i) % len(STYLES)] for i in rng.permutation(num_sites)]
    base_reasons = np.array([r.weight for r in REASONS.values()])
    profiles = []
    shifts: dict[SiteProfile, float] = {}
    for i in range(num_sites):
        site_rng = np.random.default_rng([seed, i + 1, 0])
        reasons = base_reasons * np.exp(h * site_rng.normal(0, 0.7, len(base_reasons)))
        share = min(_toward(float(site_rng.uniform(0.6, 0.8)), 1 / 3, h), MAX_DOMINANT_STYLE_SHARE)
        styles = [share if s == dominant[i] else (1 - share) / 2 for s in STYLES]
        jitter = h * float(site_rng.uniform(-0.015, 0.015))
        mean_age = _toward(float(site_rng.uniform(58, 76)), IID_MEAN_AGE, bounded)
        age_sd = _toward(float(site_rng.uniform(11, 16)), IID_AGE_SD, bounded)
        female = _toward(float(site_rng.uniform(0.42, 0.6)), IID_FEMALE_FRACTION, bounded)
        comorbidity_scale = np.exp(h * site_rng.normal(0, 0.35, len(COMORBIDITIES)))
        prior_admission_rate = float(np.exp(h * site_rng.normal(0, 0.3)))
        no_follow_up = _toward(float(site_rng.uniform(0.08, 0.35)), IID_NO_FOLLOW_UP_RATE, bounded)
        profile = SiteProfile(
            name=f"site-{i + 1}",
            index=i + 1,
            train_records=max(1, round(float(sizes[i]))),
            test_records=test_records,
            mean_age=round(float(mean_age), 2),
            age_sd=round(float(age_sd), 2),
            female_fraction=round(float(female), 3),
            reason_weights=tuple(round(float(w), 4) for w in reasons / reasons.sum()),
            comorbidity_scale=tuple(round(float(s), 3) for s in comorbidity_scale),
            prior_admission_rate=round(prior_admission_rate, 3),
            no_follow_up_rate=round(float(no_follow_up), 3),
            style_weights=tuple(round(float(w), 4) for w in styles),
            target_prevalence=round(float(np.clip(prevalences[i] + jitter, *PREVALENCE_RANGE)), 4),
            intercept_shift=0.0,
        )
        # Sites with the same case mix get the same shift, not one per Monte Carlo draw.
        mix = replace(profile, name="", index=0, train_records=0, test_records=0)
        if mix not in shifts:
            shifts[mix] = _solve_shift(profile, np.random.default_rng([seed, i + 1, 1]))
        profiles.append(replace(profile, intercept_shift=shifts[mix]))
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


class ForeignDirectory(ValueError):
    """A directory to write a synthetic federation into holds files fedtune did not make."""


def check_ours(out_dir: Path) -> None:
    """Refuse (ForeignDirectory) a directory that holds files but no synthetic federation."""
    if not out_dir.is_dir() or made_here(out_dir):
        return
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir())
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise ForeignDirectory(
            f"{out_dir} holds files fedtune did not make ({shown}) and no federation.json of a "
            "synthetic federation; nothing was written there. Give a new or empty directory "
            "for a synthetic federation"
        )


def made_here(out_dir: Path) -> bool:
    """Whether OUT/federation.json is the summary of a synthetic federation we wrote."""
    try:
        summary = json.loads((out_dir / "federation.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"seed", "sites", "risk_model"} <= set(summary)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # synthetic data, so readable by others (mkstemp alone would make it owner-only)
    write_atomic(path, text, mode=0o644)


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
    heterogeneity: float = 1.0,
) -> FederationSummary:
    """Write OUT/site-N/{train,test,instruct-train,instruct-test}.jsonl and OUT/federation.json.

    OUT must be new, empty, or a synthetic federation written here before (it has our
    federation.json): a directory holding anything else may hold someone's records, and is
    refused (ForeignDirectory) with nothing written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(out_dir))
    check_ours(out_dir)
    summaries = []
    profiles = site_profiles(num_sites, seed, records_per_site, test_records, heterogeneity)
    for profile in profiles:
        data = generate_site(profile, seed)
        site_dir = out_dir / profile.name
        _write(site_dir / "train.jsonl", _jsonl(data.train))
        _write(site_dir / "test.jsonl", _jsonl(data.test))
        _write(site_dir / "instruct-train.jsonl", _jsonl(data.instruct_train))
        _write(site_dir / "instruct-test.jsonl", _jsonl(data.instruct_test))
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
    summary = FederationSummary(
        out_dir=out_dir,
        seed=seed,
        sites=tuple(summaries),
        heterogeneity=float(heterogeneity),
        records_per_site=records_per_site or DEFAULT_MEAN_RECORDS,
    )
    _write(out_dir / "federation.json", json.dumps(summary.to_json(), indent=2) + "\n")
    return summary
