"""Operator and fleet tools on the station: the live viewer, the environment doctor."""
