"""Federated + personalised: every simulated site adapts the run's global adapter to its own
records as `fedtune-site personalise` does (client/personalise.py: one more pass over its
training split, kept only where its validation split says it helps), scored where the site
is scored (simulations/federation.py).
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
from common.evaluation import score
from common.model import load_adapted_model, set_threads
from common.records import DataError
from common.sitefiles import find_sites
from simulations.federation import scored_set
from simulations.scoring import SiteScore, site_score

log = logging.getLogger(__name__)
MODE = "personalised"


def personalised_scores(
    adapter_dir: Path, cfg: FedtuneConfig, data_dir: Path, federated: Sequence[SiteScore]
) -> tuple[list[SiteScore], list[dict[str, Any]]]:
    """Each site's personalised model scored on the records the site is scored on, and what
    personalising did at each site (validation before and after, whether it was kept). A
    site whose training file does not load keeps the global adapter: its `federated` score."""
    set_threads(0)
    global_scores = {s.site: s for s in federated}
    scores, done = [], []
    for site in find_sites(data_dir):
        try:
            data = load_site(site.train, cfg)
        except DataError as e:  # the error names lines and problems, never record text
            log.warning("%s: not personalised, its training file is invalid: %s", site.name, e)
            scores.append(global_scores[site.name])
            done.append({"site": site.name, "kept": False, "skipped": "invalid data"})
            continue
        model = load_adapted_model(adapter_dir, cfg)  # the global adapter, afresh per site
        result = personalise(model, data, cfg)
        scores.append(site_score(site.name, score(model, scored_set(site, cfg), cfg)))
        done.append({"site": site.name, **asdict(result)})
    return scores, done
