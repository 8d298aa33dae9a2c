"""The demonstration scenarios, apart from the library (issue 30): :mod:`.cli` (``python -m stabkernels demo``:
argument parsing, the digits shoot-out's runs, summaries and plots, and the ``lm`` and ``lr-sweep`` scenarios'
entry points), :mod:`.digits` (the MLP on scikit-learn's digits and each optimizer's factory), :mod:`.lm` (the
byte-level transformer on the standard library's sources), :mod:`.lr_sweep` (the learning-rate sweep of that
transformer). The library never imports this package. The old paths ``stabkernels.digits``, ``stabkernels.lm``
and ``stabkernels.lr_sweep`` are aliases of these modules (the same module objects)."""


def main(argv=None) -> int:
    """``python -m stabkernels demo`` (:func:`.cli.main`; imported on call, so importing a scenario module does
    not load the command line's)."""
    from .cli import main as run

    return run(argv)
