"""The transformer: typed config, layers, attention, parameters and losses."""
