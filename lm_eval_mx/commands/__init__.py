"""Layer 7, commands: the ``lm-eval-mx`` command line, one module per subcommand.

``cli`` dispatches; ``compare``, ``divergence``, ``search``, ``quantize`` and ``demo`` are the subcommands; ``args`` parses
the inputs they share and ``results_table`` renders compare's table. May import every layer below.
"""
