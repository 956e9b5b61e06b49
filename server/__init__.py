"""The coordinator: strategies, update checks, checkpoints and resume, the ServerApp."""
