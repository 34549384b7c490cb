"""Methods layer: where log-probs become a loss. One file per method (its formula and its objective), found by
the registry; UDM's prompt density ratio; the shared base."""
