"""Retrieval evaluation: data sets, encoding, exact search, metrics."""
