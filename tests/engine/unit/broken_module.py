"""A handler module whose import fails: tests/engine/unit/test_dispatch.py checks the route error names the failure."""

raise RuntimeError("settings missing")
