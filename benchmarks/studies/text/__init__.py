"""The text study: language modelling, needle retrieval, attention noise and outliers (`config.py`: its settings)."""
