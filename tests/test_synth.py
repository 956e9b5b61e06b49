"""The synthetic federation: deterministic, heterogeneous, learnable, and free of identifiers."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from simulations import notes, synth
from simulations.cli import main

FILES = ("train.jsonl", "test.jsonl", "instruct-train.jsonl", "instruct-test.jsonl")
MONTHS = (
    r"Jan(uary)?|Feb(ruary)?|Mar(ch)?|Apr(il)?|May|June?|July?|Aug(ust)?|Sep(t|tember)?"
    r"|Oct(ober)?|Nov(ember)?|Dec(ember)?"
)
IDENTIFIER_PATTERNS = {
    "e-mail": re.compile(r"[\w.+-]+@[\w-]+\.\w+"),
    "url": re.compile(r"https?://|www\."),
    "phone": re.compile(r"\(?\d{3}\)?[-. ]\d{3}[-. ]\d{4}"),
    "ssn": re.compile(r"\d{3}-\d{2}-\d{4}"),
    "slash date": re.compile(r"\b\d{1,2}/\d{1,2}/\d{2,4}\b"),
    "dash date": re.compile(r"\b\d{1,4}-\d{1,2}-\d{1,4}\b"),
    "month/day": re.compile(r"\b(0?[1-9]|1[0-2])[/-](0?[1-9]|[12]\d|3[01])\b"),
    "month and day": re.compile(rf"\b({MONTHS})\.?\s+\d{{1,2}}\b"),
    "titled name": re.compile(r"\b(Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+[A-Z]"),
    "record number": re.compile(r"\b(MRN|SSN|DOB)\b|\b\d{5,}\b"),
    "year": re.compile(r"(?<![\d.])(19|20)\d{2}(?![\d.])"),
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("federation")
    synth.write_federation(out, num_sites=3, seed=0)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        seed = 1 if name == "c" else 7
        synth.write_federation(tmp_path / name, num_sites=2, seed=seed, records_per_site=40)
    a, b, c = (all_files(tmp_path / name) for name in ("a", "b", "c"))
    expected = ["federation.json"] + [f"site-{i}/{f}" for i in (1, 2) for f in FILES]
    assert sorted(a) == sorted(expected)
    assert a == b
    assert a["site-1/train.jsonl"] != c["site-1/train.jsonl"]
    assert a["site-2/test.jsonl"] != c["site-2/test.jsonl"]


def test_train_split_does_not_depend_on_test_size(tmp_path: Path) -> None:
    synth.write_federation(tmp_path / "a", 1, seed=3, records_per_site=30, test_records=10)
    synth.write_federation(tmp_path / "b", 1, seed=3, records_per_site=30, test_records=25)
    train = "site-1/train.jsonl"
    assert (tmp_path / "a" / train).read_bytes() == (tmp_path / "b" / train).read_bytes()
    assert len(read_jsonl(tmp_path / "b/site-1/test.jsonl")) == 25


def test_sites_differ_in_size_prevalence_case_mix_and_style(federation: Path) -> None:
    summary = json.loads((federation / "federation.json").read_text())
    sites = summary["sites"]
    sizes = [s["train_records"] for s in sites]
    assert len(set(sizes)) == 3 and min(sizes) >= 200 and max(sizes) <= 950
    prevalences = [s["prevalence"] for s in sites]
    assert max(prevalences) - min(prevalences) > 0.1
    assert all(0.15 <= p <= 0.5 for p in prevalences)
    words = {s["dominant_style"]: s["mean_words"] for s in sites}
    assert set(words) == set(notes.STYLES)
    assert words["terse"] + 15 < words["sectioned"] and words["terse"] + 15 < words["narrative"]
    profiles = synth.site_profiles(3, seed=0)
    assert [p.train_records for p in profiles] == sizes
    assert len({p.reason_weights for p in profiles}) == 3
    assert len({round(p.mean_age) for p in profiles}) > 1


def test_records_per_site_sets_the_mean_size() -> None:
    profiles = synth.site_profiles(5, seed=0, records_per_site=100, test_records=7)
    sizes = [p.train_records for p in profiles]
    assert sum(sizes) / len(sizes) == pytest.approx(100, abs=2)
    assert len(set(sizes)) == 5 and all(p.test_records == 7 for p in profiles)


def _tv_spread(profiles: list[synth.SiteProfile]) -> float:
    """Mean total-variation distance between the sites' admission-reason distributions."""
    weights = [np.array(p.reason_weights) for p in profiles]
    pairs = [(a, b) for i, a in enumerate(weights) for b in weights[i + 1 :]]
    return float(np.mean([0.5 * np.abs(a - b).sum() for a, b in pairs]))


def test_heterogeneity_one_is_todays_federation() -> None:
    profiles = synth.site_profiles(3, seed=0, heterogeneity=1.0)
    assert profiles == synth.site_profiles(3, seed=0)
    # The numbers the generator gave before the knob existed; the record files follow from them.
    assert [p.train_records for p in profiles] == [891, 259, 575]
    assert [p.target_prevalence for p in profiles] == [0.4188, 0.3357, 0.2186]
    assert [p.intercept_shift for p in profiles] == [0.9233, -0.0147, -0.9432]
    assert [p.style_weights for p in profiles] == [
        (0.1041, 0.1041, 0.7918),
        (0.7749, 0.1126, 0.1126),
        (0.1106, 0.7789, 0.1106),
    ]


def test_heterogeneity_zero_makes_sites_alike_but_not_their_patients(tmp_path: Path) -> None:
    profiles = synth.site_profiles(4, seed=2, records_per_site=30, heterogeneity=0)
    mixes = {replace(p, name="", index=0) for p in profiles}
    assert len(mixes) == 1, "sites differ in more than name"
    (mix,) = mixes
    assert mix.train_records == 30 and mix.target_prevalence == synth.IID_PREVALENCE
    assert len(set(mix.style_weights)) == 1 and profiles[0].dominant_style == "mixed"
    synth.write_federation(tmp_path, 2, seed=2, records_per_site=30, heterogeneity=0)
    assert json.loads((tmp_path / "federation.json").read_text())["heterogeneity"] == 0.0
    site_1, site_2 = (read_jsonl(tmp_path / f"site-{i}" / "train.jsonl") for i in (1, 2))
    assert len(site_1) == len(site_2) == 30 and site_1 != site_2


def test_more_heterogeneity_spreads_sites_further() -> None:
    levels = (0.5, 1.0, 2.5)
    federations = {h: synth.site_profiles(4, seed=0, heterogeneity=h) for h in levels}
    prevalence_spread = [np.ptp([p.target_prevalence for p in federations[h]]) for h in levels]
    case_mix_spread = [_tv_spread(federations[h]) for h in levels]
    size_spread = [np.ptp([p.train_records for p in federations[h]]) for h in levels]
    dominant_share = [np.mean([max(p.style_weights) for p in federations[h]]) for h in levels]
    for spread in (prevalence_spread, case_mix_spread, size_spread, dominant_share):
        assert spread[0] < spread[1] < spread[2], spread
    assert case_mix_spread[2] > 1.5 * case_mix_spread[1]
    strong = federations[2.5]
    low, high = synth.PREVALENCE_RANGE
    assert all(low <= p.target_prevalence <= high for p in strong)
    sizes = [p.train_records for p in strong]
    assert min(sizes) >= round(synth.MIN_RELATIVE_SIZE * synth.DEFAULT_MEAN_RECORDS)
    assert all(max(p.style_weights) <= synth.MAX_DOMINANT_STYLE_SHARE for p in strong)


def test_strongly_non_iid_prevalence_is_what_the_sites_get() -> None:
    profiles = synth.site_profiles(3, seed=0, heterogeneity=2.5)
    for profile in profiles:
        data = synth.generate_site(replace(profile, train_records=1500, test_records=1), seed=0)
        assert np.mean(data.train_risk) == pytest.approx(profile.target_prevalence, abs=0.03)


def test_risk_follows_the_documented_coefficients() -> None:
    m = synth.RISK_MODEL
    patient = notes.Patient(
        age=75, sex="M", reason="heart_failure", comorbidities=("chf", "ckd"), creatinine=2.2,
        hemoglobin=9.0, sodium=131, bnp_elevated=True, length_of_stay=20, disposition="snf",
        prior_admissions=6, follow_up_days=None, follow_up_service="cardiology", medications=(),
    )  # fmt: skip
    expected = (
        m["intercept"] + 0.5 + m["age_per_decade_over_65"] + m["sex:M"]
        + m["reason:heart_failure"] + m["comorbidity:chf"] + m["comorbidity:ckd"]
        + m["creatinine_per_mg_dl_over_1.2"] * 1.0 + m["hemoglobin_per_g_dl_under_11"] * 2.0
        + m["sodium_per_mmol_under_135"] * 4 + m["bnp_elevated"]
        + m["length_of_stay_per_day_up_to_14"] * 14 + m["disposition:snf"]
        + m["prior_admissions_each_up_to_4"] * 4 + m["follow_up:none"]
    )  # fmt: skip
    assert synth.risk_logit(patient, intercept_shift=0.5) == pytest.approx(expected)
    assert synth.readmission_risk(patient, 0.5) == pytest.approx(1 / (1 + math.exp(-expected)))
    soon = replace(patient, follow_up_days=7)
    assert synth.risk_logit(soon) - synth.risk_logit(patient) == pytest.approx(
        m["follow_up:within_7_days"] - m["follow_up:none"]
    )


def test_prevalence_matches_the_risk_model() -> None:
    profile = synth.site_profiles(1, seed=5)[0]
    data = synth.generate_site(replace(profile, train_records=3000, test_records=1), seed=5)
    labels = np.array([r["label"] for r in data.train])
    risk = np.array(data.train_risk)
    se = math.sqrt(np.mean(risk * (1 - risk)) / len(risk))
    assert abs(labels.mean() - risk.mean()) < 4 * se
    assert risk.mean() == pytest.approx(profile.target_prevalence, abs=0.03)
    assert 0.78 < roc_auc_score(labels, risk) < 0.95


def test_signal_is_learnable_from_words(federation: Path) -> None:
    site = federation / "site-1"
    train, test = read_jsonl(site / "train.jsonl"), read_jsonl(site / "test.jsonl")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, token_pattern=r"(?u)\b\w+\b")
    x_train = vectorizer.fit_transform([r["text"] for r in train])
    model = LogisticRegression(max_iter=1000).fit(x_train, [r["label"] for r in train])
    scores = model.predict_proba(vectorizer.transform([r["text"] for r in test]))[:, 1]
    assert roc_auc_score([r["label"] for r in test], scores) > 0.7


def test_records_have_the_documented_fields(federation: Path) -> None:
    bands = {band for _, _, band in synth.AGE_BANDS} | {synth.OLDEST_AGE_BAND}
    for site in sorted(federation.glob("site-*")):
        for name in ("train.jsonl", "test.jsonl"):
            for r in read_jsonl(site / name):
                assert list(r) == ["text", "label", "age_band", "sex"]
                assert isinstance(r["text"], str) and r["text"].strip()
                assert r["label"] in (0, 1) and type(r["label"]) is int
                assert r["age_band"] in bands and r["sex"] in ("F", "M")
        classification = read_jsonl(site / "train.jsonl")
        instruct = read_jsonl(site / "instruct-train.jsonl")
        assert len(instruct) == len(classification)
        for r, c in zip(instruct, classification, strict=True):
            assert list(r) == ["prompt", "completion"]
            assert r["prompt"].startswith(c["text"]) and r["prompt"].endswith("Answer:")
            assert r["completion"].startswith(" ") and 1 <= len(r["completion"].split()) <= 4
            if "readmission within 30 days" in r["prompt"]:
                assert r["completion"] == (" yes" if c["label"] else " no")
    summary = json.loads((federation / "federation.json").read_text())
    assert summary["seed"] == 0 and summary["risk_model"] == synth.RISK_MODEL
    assert all(isinstance(v, float) for v in summary["risk_model"].values())


def test_notes_state_key_facts_before_the_medication_list(federation: Path) -> None:
    for r in read_jsonl(federation / "site-1" / "train.jsonl"):
        text = r["text"]
        follow_up = re.search(r"follow-up|f/u", text, flags=re.IGNORECASE)
        assert follow_up is not None, text
        meds = re.search(r"Meds:|Discharge medications:", text)
        if meds:
            assert follow_up.start() < meds.start()
        assert re.search(r"\b\d{2}(-year-old|[FM]\b)", text[:120]), text


def test_no_identifiers_anywhere(federation: Path) -> None:
    for path in sorted(federation.rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text()
        for kind, pattern in IDENTIFIER_PATTERNS.items():
            match = pattern.search(text)
            assert match is None, f"{path.name}: {kind} {match.group(0)!r}"
        ages = [int(a) for a in re.findall(r"\b(\d+)(?:-year-old|[FM]\b)", text)]
        assert all(18 <= a <= synth.MAX_AGE for a in ages)


def test_cli_writes_a_federation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fed"
    argv = ["data", "--sites", "3", "--out", str(out), "--records", "40", "--test-records", "10"]
    assert main(argv) == 0
    assert all((out / f"site-{i}" / name).is_file() for i in (1, 2, 3) for name in FILES)
    stdout = capsys.readouterr().out
    assert "site-3" in stdout and "prevalence" in stdout


def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--sites", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--sites: must be at least 1, got 0" in capsys.readouterr().err
    file = tmp_path / "file"
    file.write_text("")
    assert main(["data", "--sites", "2", "--out", str(file)]) == 1
    err = capsys.readouterr().err
    assert "not a directory" in err and "Traceback" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text("lora.rnak = 3\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert 'unknown config key "lora.rnak"' in err and "Traceback" not in err


def test_cli_sets_heterogeneity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "iid"
    argv = ["data", "--sites", "2", "--out", str(out), "--records", "20", "--test-records", "5"]
    assert main([*argv, "--heterogeneity", "0"]) == 0
    summary = json.loads((out / "federation.json").read_text())
    assert summary["heterogeneity"] == 0.0
    assert [s["train_records"] for s in summary["sites"]] == [20, 20]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--heterogeneity", "7"])
    assert exit_info.value.code == 2
    assert "--heterogeneity: must be from 0 to 5.0, got 7" in capsys.readouterr().err


def test_write_federation_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_sites"):
        synth.write_federation(tmp_path, num_sites=0)
    with pytest.raises(ValueError, match="test_records"):
        synth.write_federation(tmp_path, num_sites=1, test_records=0)
    with pytest.raises(ValueError, match="heterogeneity must be between 0"):
        synth.write_federation(tmp_path, num_sites=1, heterogeneity=-0.5)
    assert not any(tmp_path.iterdir())


def test_a_directory_of_someone_elses_records_is_never_written_into(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Site folders without our federation.json: `fedtune-sim data` and `fedtune-sim run`
    (which makes the synthetic federation when simulation.data-dir has none) refuse them,
    naming the directory, and leave every file as it was."""
    theirs = tmp_path / "hospitals"
    (theirs / "site-1").mkdir(parents=True)
    (theirs / "site-1" / "train.jsonl").write_text('{"text": "their note", "label": 1}\n')
    (theirs / "notes.csv").write_text("text,label\nanother note,0\n")
    before = all_files(theirs)

    with pytest.raises(synth.ForeignDirectory, match="hospitals holds files fedtune did not"):
        synth.write_federation(theirs, num_sites=2, seed=0, records_per_site=20)
    assert main(["data", "--sites", "2", "--out", str(theirs)]) == 1
    err = capsys.readouterr().err
    assert f"{theirs} holds files fedtune did not make (notes.csv, site-1/)" in err
    # `fedtune-sim run` takes site folders for the researcher's own federation, only read
    # (here refused: one site cannot make the two a round waits for)
    config = tmp_path / "own-data.toml"
    config.write_text(f'simulation.data-dir = "{theirs}"\n')
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert f"{theirs} holds 1 site(s), fewer than federation.min-sites 2" in err
    assert "their note" not in err and "Traceback" not in err
    # and files that are not site folders are neither a federation nor written into
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "notes.csv").write_text("text,label\nanother note,0\n")
    config.write_text(f'simulation.data-dir = "{exports}"\n')
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "simulation.data-dir" in err and f"{exports} holds files" in err
    assert "another note" not in err and "Traceback" not in err
    assert all_files(theirs) == before and all_files(exports) == {
        "notes.csv": b"text,label\nanother note,0\n"
    }

    ours = tmp_path / "synthetic"  # one written before is ours to write again
    synth.write_federation(ours, num_sites=2, seed=0, records_per_site=20)
    synth.write_federation(ours, num_sites=2, seed=1, records_per_site=20)
    assert json.loads((ours / "federation.json").read_text())["seed"] == 1


def test_the_site_phi_scanner_reports_nothing(federation: Path) -> None:
    phi = pytest.importorskip("client.phi")
    for site in sorted(federation.glob("site-*")):
        for name in FILES:
            rows = enumerate(read_jsonl(site / name), start=1)
            report = phi.scan_rows(
                (i, {k: v for k, v in r.items() if isinstance(v, str)}) for i, r in rows
            )
            assert report.clean, f"{site.name}/{name}: {report.summary()}"
