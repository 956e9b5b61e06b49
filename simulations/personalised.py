"""Federated + personalised: every simulated site adapts the run's global adapter to its own
records as `fedtune-site personalise` does (client/personalise.py: one more pass over its
training split, kept only where its validation split says it helps), scored on its test file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from client.dataset import load_site
from client.personalise import personalise
from common.config import FedtuneConfig
from common.evaluation import load_eval_file, score
from common.model import load_adapted_model, set_threads
from common.records import DataError
from simulations.scoring import SiteScore, site_dirs, site_score

log = logging.getLogger(__name__)
MODE = "personalised"


def personalised_scores(
    adapter_dir: Path, cfg: FedtuneConfig, data_dir: Path, federated: Sequence[SiteScore]
) -> tuple[list[SiteScore], list[dict[str, Any]]]:
    """Each site's personalised model scored on its test.jsonl, and what personalising did
    at each site (validation before and after, whether it was kept). A site whose training
    file does not load keeps the global adapter: its `federated` score."""
    set_threads(0)
    global_scores = {s.site: s for s in federated}
    scores, done = [], []
    for directory in site_dirs(data_dir):
        try:
            site = load_site(directory / "train.jsonl", cfg)
        except DataError as e:  # the error names lines and problems, never record text
            log.warning("%s: not personalised, its training file is invalid: %s", directory.name, e)
            scores.append(global_scores[directory.name])
            done.append({"site": directory.name, "kept": False, "skipped": "invalid data"})
            continue
        model = load_adapted_model(adapter_dir, cfg)  # the global adapter, afresh per site
        result = personalise(model, site, cfg)
        test = load_eval_file(directory / "test.jsonl", cfg)
        scores.append(site_score(directory.name, score(model, test, cfg)))
        done.append({"site": directory.name, **asdict(result)})
    return scores, done
