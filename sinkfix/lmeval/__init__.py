"""Downstream evaluation with lm-evaluation-harness: the ``sinkfix`` model type, offline tasks, and
stock-vs-corrected comparisons with paired statistics (``sinkfix eval``).

Importing this package needs nothing beyond sinkfix; the modules that use lm-eval import it when
they are first used (``pip install 'sinkfix[eval]'``).
"""
