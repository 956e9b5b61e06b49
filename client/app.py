"""The Flower ClientApp (`[tool.flwr.app.components] clientapp`).

Not implemented yet: the federation issue (#3) wires its train and evaluate handlers to
`client.dataset.load_site`, `client.train.train_local` and `client.train.evaluate`.
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

app = ClientApp()
