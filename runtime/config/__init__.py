"""Station config: one TOML file per station, its typed tables and validation."""
