"""One script per figure the README and docs/results.md claim; each writes one JSON under
``experiments/results/<machine>/`` through ``exp3lib.env.write_json`` (machine, dtype, versions and
commit included) and takes the model options of ``exp3lib.cli`` (``--model --device --dtype``, and
``--seq --new-tokens`` where it generates) where it loads a model. Run as modules from the
repository root: ``python -m experiments.bench.<name> --help``.

The scripts that sat at ``experiments/`` top level as ``bench_<name>.py`` are here as ``<name>.py``
(``bench_70b`` as ``multi_gpu``, ``bench_sharing`` as ``reliability``); they still write the result
files they wrote before (``bench_patching_*.json``, ``bench_sharing.json``, ...), so new results sit
beside the old ones and a results note's file pattern still finds them. ``wire_paths.py`` is
``server.py``'s library, not a script."""
