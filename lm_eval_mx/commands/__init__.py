"""Layer 7, commands: the ``lm-eval-mx`` command line, one module per subcommand.

``cli`` dispatches; ``compare``, ``divergence``, ``search`` and ``demo`` are the subcommands; ``args`` parses
the inputs they share and ``results_table`` renders compare's table. May import every layer below.
"""
