"""The d2d command line (installed as the `d2d_cli` package)."""
