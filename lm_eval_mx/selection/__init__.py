"""Layer 4, selection: which matmuls of a model run in MX, and how.

``config`` (``MXConfig`` and the one parser of user arguments; plain Python, no torch), ``values`` (parsers of
single values and the role names, re-exported by ``config``), ``roles`` (a layer's role from its structure),
``apply`` (select, check every setting is used, convert) and ``report`` (``MXReport``). May import: nn, kernels, numerics.
"""
