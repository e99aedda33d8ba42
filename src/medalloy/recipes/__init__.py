"""One file per method: each wires data, model and loss, then calls the engine."""
