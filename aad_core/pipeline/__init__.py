"""The pipeline stages (curate+cluster, select, train, evaluate, calibrate router, distill).

Each stage reads the previous stage's artifact from ``.aad/state/`` and writes its own, so any
stage can be re-run or resumed on its own.
"""
