"""Optional integrations with training frameworks; each is imported explicitly, never by ``import weightgeo``.

- :mod:`weightgeo.integrations.transformers`: ``WeightGeoCallback``, a ``transformers.TrainerCallback``.
"""
