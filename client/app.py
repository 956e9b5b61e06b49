"""The Flower ClientApp (`[tool.flwr.app.components] clientapp`): glue only.

Each handler unpacks the message, calls `client.rounds`, and packs a reply holding the
adapter and numeric metrics, nothing else; server/app.py drives it.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.rounds import evaluate_round, site_data_path, train_round
from common.config import FedtuneConfig, load_config
from common.wire import from_record, to_record

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on this site's data; reply with the new adapter."""
    cfg = load_config(context.run_config)
    config = _config_record(msg)
    state, metrics = train_round(
        cfg,
        site_data_path(context.node_config, cfg),
        from_record(msg.content["arrays"]),
        server_round=int(config.get("server-round", 1)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    arrays = to_record(state, cfg.federation.wire_dtype)
    metrics["bytes-up"] = arrays.count_bytes()
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global adapter on this site's validation (or test) split."""
    cfg: FedtuneConfig = load_config(context.run_config)
    split = str(_config_record(msg).get("split", "val"))
    metrics = evaluate_round(
        cfg, site_data_path(context.node_config, cfg), from_record(msg.content["arrays"]), split
    )
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _config_record(msg: Message) -> ConfigRecord:
    record = msg.content.get("config")
    return record if isinstance(record, ConfigRecord) else ConfigRecord()
