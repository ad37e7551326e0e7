"""Stage 6, evaluation: how good is a trained model? Validation loss and HumanEval pass@k.

Read in this order:
1. `loss.py`          - `evaluate-loss`: the training loop's validation loss, for a saved model.
2. `humaneval.py`     - HumanEval: sample completions, run them, the unbiased pass@k estimator.
3. `sandbox.py`       - run untrusted model-written programs, one confined child process each.

Skip on a first reading: `sandbox_child.py`, the kernel confinement (Landlock, seccomp, namespaces)
that the child applies to itself before the program runs.
"""
