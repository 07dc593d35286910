"""The `thinpool` command line (installed as the package ``thinpool_cli``)."""
