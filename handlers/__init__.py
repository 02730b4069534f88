"""The shop: five services built on the engine's public API, and the tools that drive them (``handlers.tools``)."""

from pathlib import Path

SHOP_YAML = Path(__file__).with_name("shop.yaml")
"""The shop's config, installed with the package: the default of ``jetpool demo``, ``chaos`` and ``audit``."""
