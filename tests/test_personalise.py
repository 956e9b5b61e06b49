"""Personalisation after a federation: more local training from the global adapter, kept only
where the site's validation split says it is better."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.cli import EXIT_OK, main
from client.dataset import load_site
from client.personalise import personalise
from client.train import train_local
from common.adapter import get_adapter_state, load_adapter, save_adapter
from common.config import FedtuneConfig, load_config
from common.model import build_model, load_adapted_model


def _cfg(model_dir: Path, **extra: object) -> FedtuneConfig:
    keys = {
        "model.path": str(model_dir),
        "lora.rank": 4,
        "data.max-length": 32,
        "data.val-fraction": 0.25,
        "train.batch-size": 8,
        "train.learning-rate": 2e-2,
        "train.warmup-steps": 0,
    }
    return load_config({**keys, **extra})


@pytest.fixture
def global_adapter(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    """The shared initial adapter, standing in for a global one that has not learnt this
    site's signal yet."""
    model = build_model(_cfg(tiny_bert_dir))
    out = tmp_path / "global"
    save_adapter(get_adapter_state(model), model.peft_config["default"], out)
    return out


def test_personalising_keeps_the_adapted_adapter_where_validation_improves(
    tiny_bert_dir: Path, global_adapter: Path, text_file: Path
) -> None:
    cfg = _cfg(tiny_bert_dir, **{"train.learning-rate": 5e-2})
    model = load_adapted_model(global_adapter, cfg)
    start = get_adapter_state(model)
    result = personalise(model, load_site(text_file, cfg), cfg, epochs=3)
    assert result.criterion == "auroc" and result.steps > 0
    assert result.kept and result.after > result.before
    after = get_adapter_state(model)
    assert any(not torch.equal(after[k], start[k]) for k in start)


def test_a_worse_adaptation_is_dropped_and_the_global_adapter_kept_exactly(
    tiny_bert_dir: Path, global_adapter: Path, text_file: Path
) -> None:
    cfg = _cfg(tiny_bert_dir, **{"train.learning-rate": 1.0, "train.max-grad-norm": 0.0})
    model = load_adapted_model(global_adapter, cfg)
    start = get_adapter_state(model)
    site = load_site(text_file, cfg)
    # a global adapter that already serves this site: trained here with a sane rate
    good = _cfg(tiny_bert_dir, **{"train.local-steps": 30})
    train_local(model, site.train, good)
    trained = get_adapter_state(model)
    result = personalise(model, site, cfg, epochs=2)  # lr 1.0: destroys it
    assert not result.kept and not result.after > result.before
    kept = get_adapter_state(model)
    assert all(torch.equal(kept[k], trained[k]) for k in trained)
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_the_site_command_writes_the_kept_adapter(
    tiny_bert_dir: Path,
    global_adapter: Path,
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        f'model.path = "{tiny_bert_dir}"\ndata.max-length = 32\ndata.val-fraction = 0.25\n'
        "train.batch-size = 8\ntrain.learning-rate = 0.05\ntrain.warmup-steps = 0\n"
    )
    out = tmp_path / "mine"
    args = ["personalise", "--adapter", str(global_adapter), "--data", str(text_file)]
    assert main([*args, "--config", str(config), "--epochs", "3", "--out", str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "validation auroc: global" in printed and "keeping the personalised adapter" in printed
    state, saved = load_adapter(out)
    assert saved.r == 4 and any("classifier" in k for k in state)


def test_a_simulated_site_with_invalid_training_data_keeps_the_global_adapter(
    tiny_bert_dir: Path, global_adapter: Path, tmp_path: Path
) -> None:
    from simulations.personalised import personalised_scores
    from simulations.scoring import score_sites
    from simulations.synth import write_federation

    data = tmp_path / "federation"
    write_federation(data, num_sites=2, seed=0, records_per_site=40, test_records=10)
    broken = data / "site-2" / "train.jsonl"
    broken.write_text(broken.read_text() + '{"text": "a note", "label": "maybe"}\n')
    cfg = _cfg(tiny_bert_dir, **{"train.local-steps": 2})
    federated = score_sites(global_adapter, cfg, data)
    scores, done = personalised_scores(global_adapter, cfg, data, federated)
    assert [s.site for s in scores] == ["site-1", "site-2"]
    assert scores[1] == federated[1] and done[1] == {
        "site": "site-2",
        "kept": False,
        "skipped": "invalid data",
    }
    assert done[0]["site"] == "site-1" and "before" in done[0]
