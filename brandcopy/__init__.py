"""brandcopy: turn a brand's style guide and product catalog into a brand-exclusive copywriting model.

Import submodules directly (``from brandcopy import lint``); this package imports nothing heavy.
"""

from brandcopy.display import drop_kernels_warning

__version__ = "0.1.0"

# bitsandbytes tries, on CPUs with AVX512-BF16, to download an optional faster 4-bit kernel from the
# Hugging Face Hub (kernels-community) and logs a warning when it cannot, which it never can here
# (offline, no `kernels` package). It then uses its own built-in CPU kernel, so nothing is wrong:
# drop that one message at its source instead of printing it before every train/eval command.
drop_kernels_warning()
