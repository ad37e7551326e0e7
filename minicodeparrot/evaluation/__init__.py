"""Stage 6, evaluation: how good is a trained model? Validation loss and HumanEval pass@k.

Read in this order:
1. `loss.py`          - `evaluate-loss`: the training loop's validation loss, for a saved model.
2. `humaneval.py`     - HumanEval: sample completions, score them, the unbiased pass@k estimator.
3. `checker.py`       - scoring that a program cannot forge: the tests run here, against the function
                        running in the sandbox, with plain data in between.
4. `sandbox.py`       - run untrusted model-written programs, one confined child process each.

Skip on a first reading: `sandbox_child.py`, the kernel confinement (Landlock, seccomp, namespaces, a
task cap) that the child applies to itself before the program runs, and its end of the channel.
"""
