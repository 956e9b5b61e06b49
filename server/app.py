"""The Flower ServerApp (`[tool.flwr.app.components] serverapp`).

Not implemented yet: the federation issue (#3) brings the strategies, checkpoints and resume.
Until then `flwr run .` stops at once with this message instead of pretending to federate.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Refuse to run: the federated training loop is not built yet."""
    raise NotImplementedError(
        "fedtune's ServerApp is not implemented yet; it arrives with the federation issue "
        "(#3). For local training today use: fedtune-site train --data FILE"
    )
