"""``tensorcache demo``: worker processes share one model's weights (see ``main``)."""
