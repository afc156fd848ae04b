"""Corpus recipes in lhotse's shape: ``download_<corpus>`` and ``prepare_<corpus>``."""
