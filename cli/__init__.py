"""The `weavelm` command line (installed as `weavelm.cli`)."""
