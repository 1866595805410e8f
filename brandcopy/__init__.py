"""brandcopy: turn a brand's style guide and product catalog into a brand-exclusive copywriting model.

Import submodules directly (``from brandcopy import lint``); this package imports nothing heavy.
"""

__version__ = "0.1.0"
