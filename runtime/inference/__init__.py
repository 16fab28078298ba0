"""From a frame to a verdict: preprocessing, TTA, backends, the served model, decision policy."""
