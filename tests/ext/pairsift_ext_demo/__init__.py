"""A stage package outside pairsift, for tests/pipeline/test_external_stage.py."""
