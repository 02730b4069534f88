"""A handler module whose import fails: tests/unit/test_dispatch.py checks the route error names the failure."""

raise RuntimeError("settings missing")
